"""convert never overwrites or deletes what it did not write, never follows a source file out of
its folder or blocks on one, and leaves nothing under the final name when any check fails."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from provision.errors import ConvertError, HostileContentError, ManifestError, StructureError, UsageError
from provision.stages.convert import RECORD_NAME, convert, read_record

ROOT = Path(__file__).resolve().parents[2]


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _nothing_left(parent: Path, out_name: str = "o") -> None:
    names = [p.name for p in parent.iterdir()]
    assert out_name not in names and not any(n.startswith(".provision-tmp-") for n in names), names


def _src_copy(tiny_src: Path, dest: Path) -> Path:
    shutil.copytree(tiny_src, dest)
    return dest


# ------------------------------------------------------------------------- the output folder


def test_convert_into_a_folder_holding_another_model_keeps_every_file_byte_for_byte(tiny_src: Path,
                                                                                     tmp_path: Path) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(tiny_src, other)  # consolidated.safetensors, params.json, tekken.json: names convert writes
    (other / "chat_template.jinja").write_text("{{ messages }}")
    before = _tree(other)
    for force in (False, True):
        with pytest.raises(UsageError) as e:
            convert(tiny_src, other, target="h100", scheme="bf16", force=force)
        assert e.value.exit_code == 2 and "convert did not write" in str(e.value)
        assert _tree(other) == before
    assert not any(p.name.startswith(".provision-tmp-") for p in tmp_path.iterdir())


def test_cli_refuses_a_foreign_out_with_exit_2(tiny_src: Path, tmp_path: Path) -> None:
    from provision.cli.main import run_cli

    out = tmp_path / "o"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"user's weights")
    assert run_cli(["convert", str(tiny_src), "--out", str(out), "--target", "h100", "--scheme", "bf16"]) == 2
    assert run_cli(["convert", str(tiny_src), "--out", str(out), "--target", "h100", "--scheme", "bf16",
                    "--force"]) == 2
    assert (out / "model.safetensors").read_bytes() == b"user's weights"
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]


def test_force_adds_the_conversion_next_to_other_files_without_touching_them(tiny_src: Path,
                                                                             tmp_path: Path) -> None:
    out = tmp_path / "o"
    (out / "notes").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "notes" / "a.md").write_text("also mine")
    before = _tree(out)
    res = convert(tiny_src, out, target="h100", scheme="bf16", force=True)
    after = _tree(out)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == sorted([n for n, _ in res.files] + [RECORD_NAME, "provenance.json"])
    # a second --force run replaces its own files (recorded in provision-convert.json), not the user's
    res2 = convert(tiny_src, out, target="h100", scheme="fp8", layout="hf", hf_tokenizer=False, force=True)
    after2 = _tree(out)
    assert {k: after2[k] for k in before} == before
    assert sorted(set(after2) - set(before)) == sorted([n for n, _ in res2.files] + [RECORD_NAME, "provenance.json"])
    assert "consolidated.safetensors" not in after2  # the first run's own file, replaced


def test_an_earlier_conversion_with_a_file_added_by_the_user_is_refused(tiny_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    convert(tiny_src, out, target="h100", scheme="bf16")
    (out / "README.md").write_text("my notes")
    before = _tree(out)
    with pytest.raises(UsageError):
        convert(tiny_src, out, target="h100", scheme="fp8", layout="hf")
    assert _tree(out) == before


def test_a_recorded_file_the_user_replaced_counts_as_theirs(tiny_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    convert(tiny_src, out, target="h100", scheme="bf16")
    (out / "tekken.json").write_text("{}")  # not the recorded size any more
    before = _tree(out)
    with pytest.raises(UsageError, match=r"tekken\.json"):
        convert(tiny_src, out, target="h100", scheme="bf16")
    assert _tree(out) == before


def test_a_forged_record_cannot_make_convert_delete_other_files(tiny_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "diary.txt").write_text("private")
    (out / RECORD_NAME).write_text(json.dumps({"files": [{"path": "diary.txt", "size": 7}]}))
    with pytest.raises(UsageError, match=r"diary\.txt"):
        convert(tiny_src, out, target="h100", scheme="bf16")
    assert (out / "diary.txt").read_text() == "private"


def test_an_empty_existing_out_is_used(tiny_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    res = convert(tiny_src, out, target="h100", scheme="bf16")
    assert sorted(p.name for p in out.iterdir()) == sorted([n for n, _ in res.files] + [RECORD_NAME, "provenance.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_out_inside_the_source_is_refused(tiny_copy: Path) -> None:
    before = _tree(tiny_copy)
    with pytest.raises(UsageError):
        convert(tiny_copy, tiny_copy / "out", target="h100", scheme="bf16")
    assert _tree(tiny_copy) == before


# ------------------------------------------------------------------- nothing under the final name


def test_a_failed_logit_comparison_leaves_nothing(tiny_src: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import provision.stages.convert.stage as stage

    def failing(_ref: Path, converted: Path) -> dict[str, float]:
        assert converted.name.startswith(".provision-tmp-convert-")  # compared before the commit
        raise ConvertError("the converted model's logits disagree")

    monkeypatch.setattr(stage, "compare_logits", failing)
    with pytest.raises(ConvertError):
        convert(tiny_src, tmp_path / "o", target="h100", scheme="bf16", compare=True)
    _nothing_left(tmp_path)


@pytest.mark.slow
def test_a_comparison_that_passes_is_in_the_committed_record(tiny_src: Path, tmp_path: Path) -> None:
    res = convert(tiny_src, tmp_path / "o", target="h100", scheme="bf16", compare=True)
    assert res.logits_comparison is not None and res.logits_comparison["top1_agreement"] == 1.0
    assert read_record(tmp_path / "o")["logits_comparison"] == res.logits_comparison


def test_a_failed_load_check_leaves_nothing_and_a_previous_conversion_intact(
        tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import provision.model.loader as loader

    out = tmp_path / "o"
    convert(tiny_src, out, target="h100", scheme="bf16")
    before = _tree(out)

    def refuse(path: Path) -> None:
        raise StructureError(f"{path} does not load")

    monkeypatch.setattr(loader, "check_loadable", refuse)
    with pytest.raises(StructureError):
        convert(tiny_src, out, target="h100", scheme="fp8", layout="hf", hf_tokenizer=False)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_the_load_check_refuses_a_quantization_config_no_layer_carries(tiny_src: Path, tmp_path: Path) -> None:
    from provision.model.loader import check_loadable
    from provision.stages.convert import quantization_config

    out = tmp_path / "o"
    convert(tiny_src, out, target="h100", scheme="bf16", layout="hf", hf_tokenizer=False)
    check_loadable(out)
    cfg = json.loads((out / "config.json").read_text())
    # the config a w8a16 conversion writes, on a bf16 output: no layer carries quantized parts
    cfg["quantization_config"] = quantization_config("w8a16", ratio=1.0, ignore=[])
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError):
        check_loadable(out)


def _no_group_multiple_src(tmp_path: Path) -> Path:
    from provision.testing.tiny import TINY_PARAMS, write_tiny

    # decoder in_features 64 (dim) and 96 (hidden_dim): neither a multiple of the int group size 128
    src = tmp_path / "src"
    write_tiny(src, seed=3, params={**TINY_PARAMS, "hidden_dim": 96})
    return src


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_an_int_scheme_that_would_quantize_no_layer_is_refused_before_writing(tmp_path: Path, scheme: str) -> None:
    src = _no_group_multiple_src(tmp_path)
    with pytest.raises(ManifestError) as e:
        convert(src, tmp_path / "o", target="h100", scheme=scheme, hf_tokenizer=False)
    assert e.value.exit_code == 3 and "quantize no layer" in str(e.value) and "128" in str(e.value)
    _nothing_left(tmp_path)


# ----------------------------------------------------------------------------- hostile sources


def test_a_tekken_json_symlinked_out_of_the_source_is_refused_not_copied(tiny_src: Path, tmp_path: Path) -> None:
    src = _src_copy(tiny_src, tmp_path / "src")
    private = tmp_path / "private.txt"
    private.write_text("secret")
    (src / "tekken.json").unlink()
    (src / "tekken.json").symlink_to(private)
    for layout, scheme in (("mistral", "bf16"), ("hf", "fp8")):
        with pytest.raises(HostileContentError) as e:
            convert(src, tmp_path / "o", target="h100", scheme=scheme, layout=layout, hf_tokenizer=False)
        assert e.value.exit_code == 5 and "tekken.json" in str(e.value)
        _nothing_left(tmp_path)
    assert not any(b"secret" in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != private
                   and not p.is_symlink() and p.stat().st_size < 1 << 20)


def test_a_symlink_inside_the_source_is_followed(tiny_src: Path, tmp_path: Path) -> None:
    src = _src_copy(tiny_src, tmp_path / "src")
    (src / "tekken.json").rename(src / "tekken-v7.json")
    (src / "tekken.json").symlink_to("tekken-v7.json")
    convert(src, tmp_path / "o", target="h100", scheme="bf16")
    assert (tmp_path / "o" / "tekken.json").read_bytes() == (tiny_src / "tekken.json").read_bytes()
    assert not (tmp_path / "o" / "tekken.json").is_symlink()


_CLI = "import sys; from provision.cli.main import run_cli; sys.exit(run_cli(sys.argv[1:]))"


@pytest.mark.parametrize("name", ["consolidated.safetensors", "params.json", "tekken.json"])
def test_a_fifo_in_the_source_returns_within_seconds_with_exit_5(tiny_src: Path, tmp_path: Path, name: str) -> None:
    src = _src_copy(tiny_src, tmp_path / "src")
    (src / name).unlink()
    os.mkfifo(src / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROVISION_HOME": str(tmp_path / "home")}
    # the deadline only bounds a hang: an open() of a FIFO without O_NONBLOCK never returns
    r = subprocess.run([sys.executable, "-c", _CLI, "convert", str(src), "--out", str(tmp_path / "o"),
                        "--target", "h100", "--scheme", "bf16"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 5, r.stderr[-2000:]
    assert "FIFO" in r.stderr and "Traceback" not in r.stderr
    _nothing_left(tmp_path)


def _rewrite_header(path: Path, edit: str) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    if edit == "overlap":
        # the second tensor starts inside the first (same length, so the sizes still match the shapes)
        a, b = header[names[0]], header[names[1]]
        ln = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + ln]
        text = json.dumps(header)
    else:  # a duplicate key: the first tensor's entry written twice
        body = json.dumps(header)[1:-1]
        text = "{" + f'"{names[0]}": {json.dumps(header[names[0]])}, ' + body + "}"
    enc = text.encode()
    path.write_bytes(struct.pack("<Q", len(enc)) + enc + data)


@pytest.mark.parametrize("edit", ["overlap", "duplicate"])
def test_convert_refuses_what_verify_refuses(tiny_src: Path, tmp_path: Path, edit: str) -> None:
    from provision.formats.safetensors import check_safetensors

    src = _src_copy(tiny_src, tmp_path / "src")
    _rewrite_header(src / "consolidated.safetensors", edit)
    with pytest.raises(StructureError) as v:
        check_safetensors(src / "consolidated.safetensors")  # verify's reader
    with pytest.raises(StructureError) as c:
        convert(src, tmp_path / "o", target="h100", scheme="bf16")
    assert c.value.exit_code == v.value.exit_code == 5
    _nothing_left(tmp_path)


def test_the_recorded_source_hash_is_the_sha256_of_the_file(tiny_src: Path, tmp_path: Path) -> None:
    res = convert(tiny_src, tmp_path / "o", target="h100", scheme="fp8", hf_tokenizer=False)
    want = hashlib.sha256((tiny_src / "consolidated.safetensors").read_bytes()).hexdigest()
    assert [f["sha256"] for f in res.source_files if f["path"] == "consolidated.safetensors"] == [want]
    assert read_record(tmp_path / "o")["source_files"][0]["sha256"] == want


@pytest.mark.parametrize(("key", "value"), [("num_attention_heads", 0), ("num_hidden_layers", 10**9),
                                            ("rope_theta", 10**400)], ids=["zero-heads", "billion-layers", "huge-int"])
def test_an_hf_config_with_an_impossible_value_is_exit_3(tiny_src: Path, tmp_path: Path, key: str,
                                                         value: int) -> None:
    from provision.errors import ParamsError
    from provision.model.loader import check_loadable

    out = tmp_path / "o"
    convert(tiny_src, out, target="h100", scheme="bf16", layout="hf", hf_tokenizer=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"][key] = value
    cfg["text_config"].pop("head_dim", None)  # derived from hidden_size / num_attention_heads
    cfg["text_config"].pop("rope_parameters", None)  # read before rope_theta
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ParamsError) as e:
        check_loadable(out)
    assert e.value.exit_code == 3


def test_an_interrupted_writers_temporary_in_an_earlier_conversion_is_cleaned_but_a_folder_is_foreign(
        tiny_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    convert(tiny_src, out, target="h100", scheme="bf16")
    (out / ".provision-tmp-consolidated.safetensors-123").write_bytes(b"partial")
    res = convert(tiny_src, out, target="h100", scheme="bf16")
    assert sorted(p.name for p in out.iterdir()) == sorted([n for n, _ in res.files] + [RECORD_NAME, "provenance.json"])
    (out / ".provision-tmp-fetch-1").mkdir()  # another command's staging folder: not convert's
    with pytest.raises(UsageError):
        convert(tiny_src, out, target="h100", scheme="bf16")
    assert (out / ".provision-tmp-fetch-1").is_dir()
