"""The convert stage on the tiny checkpoints: every scheme and layout, errors, kill and rerun."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from provision import quant
from provision.cli.main import run_cli
from provision.errors import (
    ConvertError,
    DiskSpaceError,
    HostileContentError,
    ParamsError,
    StructureError,
    UsageError,
)
from provision.formats.params import ModelArgs
from provision.model import hf_names as keymap
from provision.stages.convert import RECORD_NAME, convert
from tests.support.files import load_st
from tests.support.quant_bounds import format_error_bound

QUANT = ("fp8", "w8a16", "w4a16")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _out_tensors(out: Path) -> dict[str, torch.Tensor]:
    ts: dict[str, torch.Tensor] = {}
    for p in sorted(out.glob("*.safetensors")):
        ts.update(load_st(p))
    return ts


def _back_to_mistral(out: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Output tensors under Mistral names and layout (quantized parts kept as parts)."""
    ts = _out_tensors(out)
    if (out / "config.json").is_file():
        return dict(keymap.hf_to_mistral(k, v, args) for k, v in ts.items())
    return ts


@pytest.mark.parametrize("scheme", QUANT)
def test_quantized_hf_output_round_trips_within_the_scheme_bound(tiny128_src: Path, tmp_path: Path,
                                                                 scheme: str) -> None:
    out = tmp_path / scheme
    res = convert(tiny128_src, out, target="h100", scheme=scheme, hf_tokenizer=False)
    assert (res.scheme, res.layout) == (scheme, "hf")
    args = ModelArgs.from_file(tiny128_src / "params.json")
    src = load_st(tiny128_src / "consolidated.safetensors")
    back = _back_to_mistral(out, args)
    n_quant = 0
    for name, w in src.items():
        if name.endswith(".weight") and name.startswith("layers.") and w.ndim == 2:
            mod = name[: -len(".weight")]
            parts = {k.rsplit(".", 1)[1]: v for k, v in back.items() if k.startswith(mod + ".")}
            deq = quant.dequantize(parts, scheme)
            assert parts["weight_scale"].dtype == torch.bfloat16  # h100: 16-bit activations are bf16
            bound = format_error_bound(w, parts["weight_scale"], scheme)  # tests/support/quant_bounds.py
            assert bool(((w.float() - deq).abs() <= bound).all()), name
            n_quant += 1
        else:
            assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], w), name
    assert n_quant == 2 * 7
    errs = {t.name: t.relative_error for t in res.tensors if t.relative_error is not None}
    assert len(errs) == n_quant and all(0 < e < {"fp8": 0.05, "w8a16": 0.01, "w4a16": 0.2}[scheme]
                                        for e in errs.values())


@pytest.mark.parametrize("scheme,layout,dtype", [("bf16", "mistral", torch.bfloat16), ("fp16", "mistral", torch.float16),
                                                 ("bf16", "hf", torch.bfloat16), ("fp16", "hf", torch.float16)])
def test_casts_are_exact(tiny_src: Path, tmp_path: Path, scheme: str, layout: str, dtype: torch.dtype) -> None:
    out = tmp_path / "o"
    convert(tiny_src, out, target="cpu", scheme=scheme, layout=layout, hf_tokenizer=False)
    args = ModelArgs.from_file(tiny_src / "params.json")
    src = load_st(tiny_src / "consolidated.safetensors")
    back = _back_to_mistral(out, args)
    assert set(back) == set(src)
    for k, v in src.items():
        assert back[k].dtype == dtype and torch.equal(back[k], v.to(dtype)), k
    if layout == "mistral":
        assert sorted(p.name for p in out.iterdir()) == sorted(
            ["consolidated.safetensors", "params.json", "tekken.json", RECORD_NAME, "provenance.json"])
        assert (out / "params.json").read_bytes() == (tiny_src / "params.json").read_bytes()


def test_default_layout_is_mistral_for_casts_and_hf_for_quantized(tiny_src: Path, tmp_path: Path) -> None:
    assert convert(tiny_src, tmp_path / "a", target="h100", scheme="bf16").layout == "mistral"
    assert convert(tiny_src, tmp_path / "b", target="h100", scheme="w8a16", hf_tokenizer=False).layout == "hf"


def test_shard_metadata_records_scheme_and_source_sha256(tiny_src: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "o"
    convert(tiny_src, out, target="h100", scheme="fp8", hf_tokenizer=False, shard_bytes=200_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    want = _sha(tiny_src / "consolidated.safetensors")
    for s in shards:
        with safe_open(str(s), "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt" and meta["provision.scheme"] == "fp8" and meta["provision.layout"] == "hf"
        src = json.loads(meta["provision.source"])
        assert src[0] == {"path": "consolidated.safetensors", "size": (tiny_src / "consolidated.safetensors").stat().st_size,
                          "sha256": want, "sha256_from": "computed"}
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"].values()) == {s.name for s in shards}


def test_sha256_given_by_the_caller_is_recorded_without_hashing(tiny_src: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    given = "ab" * 32  # what a caller that just verified the file passes (deliberately not the real one)
    res = convert(tiny_src, tmp_path / "o", target="h100", scheme="bf16",
                  source_sha256={"consolidated.safetensors": given})
    with safe_open(str(tmp_path / "o" / "consolidated.safetensors"), "pt") as f:
        src = json.loads(f.metadata()["provision.source"])
    assert src[0]["sha256"] == given and src[0]["sha256_from"] == "caller"
    assert res.source_files[0]["sha256"] == given


@pytest.mark.parametrize("scheme,fmt", [("fp8", "float-quantized"), ("w8a16", "pack-quantized"),
                                        ("w4a16", "pack-quantized")])
def test_config_json_carries_the_compressed_tensors_quantization_config(tiny_src: Path, tmp_path: Path,
                                                                         scheme: str, fmt: str) -> None:
    out = tmp_path / "o"
    convert(tiny_src, out, target="h100", scheme=scheme, hf_tokenizer=False)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt
    w = qc["config_groups"]["group_0"]["weights"]
    assert w["num_bits"] == {"fp8": 8, "w8a16": 8, "w4a16": 4}[scheme]
    assert (w["strategy"], w["group_size"]) == (("channel", None) if scheme == "fp8" else ("group", 128))
    acts = qc["config_groups"]["group_0"]["input_activations"]
    assert (acts is not None and acts["dynamic"] and acts["strategy"] == "token") == (scheme == "fp8")
    assert {"re:.*lm_head", "re:.*multi_modal_projector.*", "re:.*vision_tower.*"} <= set(qc["ignore"])
    for name in ("preprocessor_config.json", "processor_config.json", "tekken.json", "generation_config.json"):
        assert (out / name).is_file()


@pytest.mark.slow  # 5-7 s: builds the transformers tokenizer from the 19 MB tekken.json
def test_hf_tokenizer_files_are_built_from_tekken(tiny_src: Path, tmp_path: Path) -> None:
    from tests.support.hf_reference import require_transformers

    require_transformers()
    out = tmp_path / "o"
    res = convert(tiny_src, out, target="h100", scheme="fp8")
    assert (out / "tokenizer.json").is_file() and "--tokenizer-mode" not in res.vllm_command


def test_record_holds_the_vllm_command_for_each_layout(tiny_src: Path, tmp_path: Path) -> None:
    m = convert(tiny_src, tmp_path / "m", target="l4x2", scheme="bf16")
    assert m.vllm_command.startswith(f"vllm serve {tmp_path / 'm'} --tokenizer-mode mistral --config-format mistral "
                                     "--load-format mistral --dtype bfloat16 --max-model-len 32768")
    assert "--tensor-parallel-size" not in m.vllm_command  # the tiny model fits one GPU
    h = convert(tiny_src, tmp_path / "h", target="t4", scheme="w4a16", context=4096, hf_tokenizer=False)
    assert "--quantization compressed-tensors --tokenizer-mode mistral --dtype float16 --max-model-len 4096" \
        in h.vllm_command
    rec = json.loads((tmp_path / "h" / RECORD_NAME).read_text())
    assert rec["vllm_command"] == h.vllm_command and rec["profile"]["name"] == "w4a16-hf"
    assert rec["quality"]["quantized_tensors"] >= 1


def test_t4_output_is_fp16_throughout(tiny128_src: Path, tmp_path: Path) -> None:
    convert(tiny128_src, tmp_path / "o", target="t4", scheme="w4a16", hf_tokenizer=False)
    ts = _out_tensors(tmp_path / "o")
    assert {v.dtype for k, v in ts.items() if not k.endswith(("weight_packed", "weight_shape"))} == {torch.float16}
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == "float16"


def test_converted_outputs_pass_verify(tiny_src: Path, tmp_path: Path) -> None:
    from provision.stages.verify import verify_dir

    for scheme in ("bf16", "fp8", "w4a16"):
        out = tmp_path / scheme
        convert(tiny_src, out, target="h100", scheme=scheme, hf_tokenizer=False)
        verify_dir(out).raise_for_failure()


def test_rerun_over_an_earlier_conversion_replaces_it(tiny_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    convert(tiny_src, out, target="h100", scheme="fp8", hf_tokenizer=False)
    convert(tiny_src, out, target="h100", scheme="bf16")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["consolidated.safetensors", "params.json", "tekken.json", RECORD_NAME, "provenance.json"])


# ---------------------------------------------------------------------------------------- errors


def _cli(*argv: str) -> int:
    return run_cli(["convert", *argv])


def test_cli_exit_codes_and_nothing_written(tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert _cli(str(tiny_src), "--out", str(out), "--scheme", "int3") == 2
    assert _cli(str(tiny_src), "--out", str(out), "--target", "gtx480") == 2
    assert _cli(str(tiny_src), "--out", str(out), "--target", "t4", "--scheme", "fp8") == 3
    assert _cli(str(tiny_src), "--out", str(out), "--target", "t4", "--scheme", "bf16") == 3
    assert _cli(str(tiny_src), "--out", str(out), "--target", "h100", "--scheme", "fp8", "--layout", "mistral") == 3
    assert _cli(str(tiny_src), "--out", str(out), "--target", "sm_89:0.01") == 6
    assert not out.exists()
    err = capsys.readouterr().err
    assert "use --scheme fp16" in err and "Traceback" not in err


def test_cli_json_report(tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(str(tiny_src), "--out", str(tmp_path / "o"), "--target", "a10g", "--no-hf-tokenizer", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["convert"]["profile"]["name"] == "bf16-mistral"
    assert doc["convert"]["vllm_command"].startswith("vllm serve ")


def test_full_disk_is_exit_6_before_writing(tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import provision.io.space

    monkeypatch.setattr(provision.io.space, "free_bytes", lambda _p: 1000)
    with pytest.raises(DiskSpaceError) as e:
        convert(tiny_src, tmp_path / "o", target="h100", scheme="fp8")
    assert e.value.exit_code == 6
    assert list(tmp_path.iterdir()) == []  # no output folder and no staging folder


def test_foreign_files_in_out_are_refused_and_kept(tiny_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError):
        convert(tiny_src, out, target="h100", scheme="bf16")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_out_equal_to_src_is_refused(tiny_copy: Path) -> None:
    before = sorted(p.name for p in tiny_copy.iterdir())
    with pytest.raises(UsageError):
        convert(tiny_copy, tiny_copy, target="h100", scheme="bf16")
    assert sorted(p.name for p in tiny_copy.iterdir()) == before


def test_pickle_only_source_is_refused(tmp_path: Path, tiny_src: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    (src / "params.json").write_bytes((tiny_src / "params.json").read_bytes())
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(HostileContentError) as e:
        convert(src, tmp_path / "o", target="h100", scheme="bf16")
    assert e.value.exit_code == 5


def test_bad_params_is_exit_3(tiny_copy: Path, tmp_path: Path) -> None:
    p = json.loads((tiny_copy / "params.json").read_text())
    del p["dim"]
    (tiny_copy / "params.json").write_text(json.dumps(p))
    with pytest.raises(ParamsError) as e:
        convert(tiny_copy, tmp_path / "o", target="h100")
    assert e.value.exit_code == 3


def test_tensors_not_matching_params_are_exit_5(tiny_copy: Path, tmp_path: Path) -> None:
    p = json.loads((tiny_copy / "params.json").read_text())
    p["n_layers"] = 3
    (tiny_copy / "params.json").write_text(json.dumps(p))
    with pytest.raises(StructureError) as e:
        convert(tiny_copy, tmp_path / "o", target="h100", scheme="bf16")
    assert e.value.exit_code == 5 and not any((tmp_path / "o").glob("*.safetensors"))


def test_corrupt_header_is_exit_5(tiny_copy: Path, tmp_path: Path) -> None:
    f = tiny_copy / "consolidated.safetensors"
    raw = bytearray(f.read_bytes())
    raw[0:8] = (10**12).to_bytes(8, "little")
    f.write_bytes(bytes(raw))
    with pytest.raises(HostileContentError) as e:  # a header length past the reader's limit is refused unread
        convert(tiny_copy, tmp_path / "o", target="h100", scheme="bf16")
    assert e.value.exit_code == 5
    raw[0:8] = (len(raw) - 4).to_bytes(8, "little")  # a plausible length pointing past the end of the file
    f.write_bytes(bytes(raw))
    with pytest.raises(StructureError) as e2:
        convert(tiny_copy, tmp_path / "o", target="h100", scheme="bf16")
    assert e2.value.exit_code == 5


def test_fp16_overflow_is_a_conversion_error(tiny_copy: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = load_st(tiny_copy / "consolidated.safetensors")
    sd["norm.weight"] = torch.full_like(sd["norm.weight"], 1e6)
    save_file(sd, str(tiny_copy / "consolidated.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConvertError) as e:
        convert(tiny_copy, tmp_path / "o", target="t4", scheme="fp16")
    assert e.value.exit_code == 7 and "norm.weight" in str(e.value)
    assert not (tmp_path / "o").exists()  # a failed conversion leaves no output folder (nor a staging one)
    assert not any(p.name.startswith(".provision-tmp-") for p in tmp_path.iterdir())


_KILLER = r"""
import os, signal, sys
from pathlib import Path
from provision.stages.convert import convert

def progress(ev):
    if ev.done > int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)

convert(Path(sys.argv[1]), Path(sys.argv[2]), target="h100", scheme="w8a16", hf_tokenizer=False,
        shard_bytes=150_000, progress=progress)
"""


def test_a_conversion_killed_midway_leaves_no_final_shard_and_reruns_cleanly(tiny128_src: Path,
                                                                            tmp_path: Path) -> None:
    out = tmp_path / "o"
    size = (tiny128_src / "consolidated.safetensors").stat().st_size
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-c", _KILLER, str(tiny128_src), str(out), str(size * 2 // 3)],
                       env=env, capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    assert not out.exists()  # nothing under the final name: the run wrote into a staging folder beside it
    left = [p.name for p in tmp_path.iterdir()]
    assert left and all(n.startswith(".provision-tmp-convert-o-") for n in left), left
    res = convert(tiny128_src, out, target="h100", scheme="w8a16", hf_tokenizer=False, shard_bytes=150_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # the dead run's staging folder is gone
    fresh = tmp_path / "fresh"
    convert(tiny128_src, fresh, target="h100", scheme="w8a16", hf_tokenizer=False, shard_bytes=150_000)
    for p in sorted(fresh.glob("model-*.safetensors")):
        assert _sha(p) == _sha(out / p.name)
    assert len(res.files) > 3


def test_the_tokenizer_built_in_a_child_process_is_byte_for_byte_the_one_built_in_process(
        tiny_src: Path, tmp_path: Path) -> None:
    # a big conversion builds tokenizer.json in a child process (off its interpreter), a small one
    # in its own: the files must not depend on where they were built
    from provision.stages.convert.hf_export import _write_hf_tokenizer

    got: dict[str, dict[str, bytes]] = {}
    for how in ("child", "here"):
        out = tmp_path / how
        out.mkdir()
        (out / "tekken.json").write_bytes((tiny_src / "tekken.json").read_bytes())
        names = _write_hf_tokenizer(out / "tekken.json", out, in_child=how == "child")
        assert "tokenizer.json" in names
        got[how] = {n: (out / n).read_bytes() for n in names}
        assert not [p.name for p in out.iterdir() if p.name.startswith(".provision-tmp")]  # no build folder left
    assert got["child"] == got["here"]
