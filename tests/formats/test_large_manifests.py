"""The manifests of Mixtral 8x7B / 8x22B, Mistral Large 2407 and Pixtral Large 2411: only the
reference's confirmed sizes and hashes, md5 as an authority, params for offline sizing, and
`provision plan` counting the H100s each profile needs (1, 2, 4, 8) without the network."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from provision.cli.main import run_cli
from provision.errors import HashMismatchError, ManifestError
from provision.formats.manifest import load_manifest, parse_manifest_bytes, write_manifest
from provision.formats.params import ModelArgs, parameter_count, tensor_spec
from provision.formats.sources import parse_magnet
from provision.stages.verify import authorities_from_manifest, verify_dir
from tests.support import sizing
from tests.support.reference_facts import MIXTRAL_8X7B, MIXTRAL_8X22B

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("mixtral-8x7b-v0.1", "mixtral-8x22b-v0.1", "mistral-large-2407", "pixtral-large-2411")

# Every size and hash the manifests may pin: the reference's confirmed facts (tests/support/reference_facts).
CONFIRMED: dict[str, dict[str, dict[str, Any]]] = {
    "mixtral-8x7b-v0.1": MIXTRAL_8X7B.files,
    "mixtral-8x22b-v0.1": MIXTRAL_8X22B.files,
    "mistral-large-2407": {},
    "pixtral-large-2411": {},
}


def _pinned(name: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for f in load_manifest(name).files:
        facts = {k: v for k, v in (("sha256", f.sha256), ("md5", f.md5), ("size", f.size), ("git_sha1", f.git_sha1))
                 if v is not None}
        if facts:
            out[f.path] = facts
    return out


@pytest.mark.parametrize("name", NAMES)
def test_each_manifest_pins_exactly_the_sizes_and_hashes_the_reference_confirms(name: str) -> None:
    assert _pinned(name) == CONFIRMED[name]


def test_the_magnets_carry_the_reference_infohashes_and_decoded_trackers() -> None:
    ref7, ref22 = MIXTRAL_8X7B.magnet, MIXTRAL_8X22B.magnet
    assert ref7 is not None and ref22 is not None
    m7 = parse_magnet(next(s.magnet for s in load_manifest("mixtral-8x7b-v0.1").sources if s.magnet))
    assert (m7.btih, m7.name) == (ref7.btih, ref7.name)
    assert ref7.trackers[0] in m7.trackers
    m22 = parse_magnet(next(s.magnet for s in load_manifest("mixtral-8x22b-v0.1").sources if s.magnet))
    assert (m22.btih, m22.name) == (ref22.btih, ref22.name)
    assert set(m22.trackers) == set(ref22.trackers)


def test_hf_repos_and_gating_follow_the_reference() -> None:
    repos = {n: [s.repo for s in load_manifest(n).sources if s.type == "hf"] for n in NAMES}
    assert repos == {"mixtral-8x7b-v0.1": ["mistralai/Mixtral-8x7B-v0.1"],
                     "mixtral-8x22b-v0.1": ["mistral-community/Mixtral-8x22B-v0.1"],
                     "mistral-large-2407": ["mistralai/Mistral-Large-Instruct-2407"],
                     "pixtral-large-2411": ["mistralai/Pixtral-Large-Instruct-2411"]}
    for n in NAMES:  # no source we trust names a commit: none is invented
        assert all(s.revision is None for s in load_manifest(n).sources)


def test_pickles_are_listed_optional_and_never_fetched() -> None:
    m = load_manifest("mixtral-8x7b-v0.1")
    pickles = sorted(f.path for f in m.files if f.pickle)
    assert pickles == sorted(["consolidated.00.pth"] + [f"consolidated.0{i}.pt" for i in range(8)])
    assert all(f.optional for f in m.files if f.pickle)


def test_shard_lists_match_the_reference_layouts() -> None:
    def shards(n: str) -> list[str]:
        return [f.path for f in load_manifest(n).files if f.path.endswith(".safetensors")]
    assert shards("mixtral-8x7b-v0.1") == [f"model-{i:05d}-of-00019.safetensors" for i in range(1, 20)]
    assert shards("mistral-large-2407") == [f"consolidated-{i:05d}-of-00051.safetensors" for i in range(1, 52)]
    assert shards("pixtral-large-2411") == [f"consolidated-{i:05d}-of-00052.safetensors" for i in range(1, 53)]
    assert shards("mixtral-8x22b-v0.1") == ["consolidated.safetensors"]


def test_the_params_the_manifests_carry_give_the_reference_parameter_counts() -> None:
    def args(n: str) -> ModelArgs:
        p = load_manifest(n).params
        assert p is not None
        return ModelArgs.from_dict(p)
    assert parameter_count(args("mixtral-8x7b-v0.1")) == 46_702_792_704
    assert args("mixtral-8x7b-v0.1").rope_theta_value == 1e6  # no rope_theta in the torrent's params: 1e6
    assert parameter_count(args("mixtral-8x22b-v0.1")) == 140_620_634_112
    assert parameter_count(args("mistral-large-2407")) == 122_610_069_504
    pl = args("pixtral-large-2411")
    assert pl.vision_encoder is not None and not pl.vision_encoder.adapter_bias
    assert (pl.vision_encoder.image_break_token_id, pl.vision_encoder.image_end_token_id) == (14, 15)
    decoder = sum(math.prod(s) for k, s in tensor_spec(pl).items() if not k.startswith("vision"))
    assert decoder == 122_610_069_504  # = Mistral Large 2407's


# ---------------------------------------------------------------------------------------
# md5 as an authority


def test_the_8x7b_tokenizer_authority_is_checked_by_md5_and_sha256() -> None:
    a = authorities_from_manifest(load_manifest("mixtral-8x7b-v0.1"))["tokenizer.model"]
    assert a.md5 == "37974873eb68a7ab30c4912fc36264ae" and a.sha256 and a.to_dict()["md5"] == a.md5
    a = authorities_from_manifest(load_manifest("mixtral-8x7b-v0.1"))["consolidated.00.pth"]
    assert a.kind == "manifest-md5"


def _v1_tokenizer() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).resolve().parent / "data" / "tokenizer.model.v1"


def _md5_only_manifest(tmp_path: Path) -> Path:
    text = ('schema_version = 1\nname = "md5-only"\narchitecture = "mixtral"\nformat = "hf"\n'
            '[[sources]]\ntype = "hf"\nrepo = "x/y"\n'
            '[[files]]\npath = "tokenizer.model"\nmd5 = "37974873EB68A7AB30C4912FC36264AE"\n')
    p = tmp_path / "m.toml"
    p.write_text(text)
    return p


def test_a_file_with_the_official_md5_verifies_under_the_md5_authority(tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    shutil.copy(_v1_tokenizer(), d / "tokenizer.model")
    rep = verify_dir(d, load_manifest(_md5_only_manifest(tmp_path)))
    assert rep.ok
    md5 = [c for c in rep.checks if c.name == "md5"]
    assert len(md5) == 1 and md5[0].ok and md5[0].authority == "manifest-md5"
    # and the real 8x7B manifest: the torrent's tokenizer (= mistral-common's v1) passes md5 and sha256
    real = load_manifest("mixtral-8x7b-v0.1")
    rep = verify_dir(d, replace(real, files=tuple(f for f in real.files if f.path == "tokenizer.model")))
    assert rep.ok and {c.name for c in rep.checks} >= {"md5", "sha256", "size"}


def test_a_file_whose_md5_differs_is_a_hash_mismatch_exit_5(tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    data = bytearray(_v1_tokenizer().read_bytes())
    data[1000] ^= 0xFF
    (d / "tokenizer.model").write_bytes(bytes(data))
    rep = verify_dir(d, load_manifest(_md5_only_manifest(tmp_path)))
    assert not rep.ok
    with pytest.raises(HashMismatchError) as e:
        rep.raise_for_failure()
    assert e.value.exit_code == 5 and "md5" in e.value.message


def test_the_verify_command_reports_the_md5_authority_and_exits_5_on_mismatch(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "model"
    d.mkdir()
    data = bytearray(_v1_tokenizer().read_bytes())
    data[-5] ^= 0x55
    (d / "tokenizer.model").write_bytes(bytes(data))
    code = run_cli(["verify", str(d), "--manifest", str(_md5_only_manifest(tmp_path)), "--json"])
    assert code == 5
    assert "md5" in capsys.readouterr().out


@pytest.mark.parametrize(("value", "field"), [("abc", "md5"), ("z" * 32, "md5")])
def test_a_malformed_md5_is_a_manifest_error(value: str, field: str) -> None:
    raw = (f'schema_version = 1\nname = "x"\narchitecture = "mixtral"\nformat = "hf"\n[[sources]]\ntype = "hf"\n'
           f'repo = "x/y"\n[[files]]\npath = "a"\n{field} = "{value}"\n').encode()
    with pytest.raises(ManifestError) as e:
        parse_manifest_bytes(raw)
    assert e.value.exit_code == 3 and "md5" in e.value.message


def test_a_manifest_with_broken_params_is_a_manifest_error() -> None:
    raw = (b'schema_version = 1\nname = "x"\narchitecture = "mixtral"\nformat = "hf"\n[[sources]]\ntype = "hf"\n'
           b'repo = "x/y"\n[[files]]\npath = "a"\n[params]\ndim = 8\n')
    with pytest.raises(ManifestError) as e:
        parse_manifest_bytes(raw)
    assert e.value.exit_code == 3 and "params" in e.value.message


def test_md5_and_params_survive_a_manifest_rewrite(tmp_path: Path) -> None:
    m = load_manifest("mixtral-8x7b-v0.1")
    out = write_manifest(m, tmp_path / "copy.toml")
    again = load_manifest(out.path or tmp_path / "copy.toml")
    assert again.file("consolidated.00.pth").md5 == "1faa9bc9b20fcfe81fcd4eb7166a79e6"  # type: ignore[union-attr]
    assert again.params == m.params and again.files == m.files


# ---------------------------------------------------------------------------------------
# provision plan, offline, for 1, 2, 4 and 8 H100s


def _plan(name: str, target: str, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    assert run_cli(["plan", name, "--offline", "--target", target, "--json", *extra]) == 0
    prof: dict[str, Any] = json.loads(capsys.readouterr().out)["profiles"]
    return prof


# Fewest H100s (81,559 MiB = 85.52 GB each) per scheme at a 32k context:
# (weights + KV cache) x 1.1 / GPUs, weights from the parameter count and bytes per weight
# (tests/support/sizing.py; worked out again in the test right below). Need for the whole model, GB:
#                      bf16    fp8   w8a16  w4a16   KV cache
#   mixtral-8x7b      107.5   56.4   57.2   31.6    4.3   -> 2 (53.7 per GPU), 1, 1, 1
#   mixtral-8x22b     317.6  163.4  165.8   88.7    7.5   -> 4 (79.4), 2, 2, 2 (88.7 > 85.5 on one)
#   mistral-large     282.7  148.8  150.8   83.9   11.8   -> 4 (70.7), 2, 2, 1 (dense 123B: int4 just fits)
#   pixtral-large     286.1  152.1  154.2   87.2   11.8   -> 4, 2, 2, 2 (the 1.5B vision tower tips int4 over)
EXPECTED_GPUS = {
    "mixtral-8x7b-v0.1": {"bf16": 2, "fp8": 1, "w8a16": 1, "w4a16": 1},
    "mixtral-8x22b-v0.1": {"bf16": 4, "fp8": 2, "w8a16": 2, "w4a16": 2},
    "mistral-large-2407": {"bf16": 4, "fp8": 2, "w8a16": 2, "w4a16": 1},
    "pixtral-large-2411": {"bf16": 4, "fp8": 2, "w8a16": 2, "w4a16": 2},
}
ARCH = {"mixtral-8x7b-v0.1": sizing.MIXTRAL_8X7B, "mixtral-8x22b-v0.1": sizing.MIXTRAL_8X22B,
        "mistral-large-2407": sizing.MISTRAL_LARGE_2407, "pixtral-large-2411": sizing.PIXTRAL_LARGE_2411}
H100_BYTES = 81559 * 2**20  # what the driver reports for an H100 80GB HBM3


@pytest.mark.parametrize("name", NAMES)
def test_the_expected_h100_counts_follow_from_parameter_counts_and_bytes_per_weight(name: str) -> None:
    arch = ARCH[name]
    assert arch.quantized_params() < arch.total_params
    assert {s: arch.gpus_needed(s, H100_BYTES) for s in EXPECTED_GPUS[name]} == EXPECTED_GPUS[name]


def test_the_sizing_arches_match_the_params_the_manifests_carry() -> None:
    for name, arch in ARCH.items():
        p = load_manifest(name).params
        assert p is not None
        moe = p.get("moe") or {}
        assert (p["dim"], p["n_layers"], p["head_dim"], p["hidden_dim"], p["n_heads"], p["n_kv_heads"],
                moe.get("num_experts", 1)) == (arch.dim, arch.n_layers, arch.head_dim, arch.hidden_dim,
                                               arch.n_heads, arch.n_kv_heads, arch.experts), name
    assert sizing.PIXTRAL_LARGE_VISION == 1_524_776_320


@pytest.mark.parametrize("name", NAMES)
def test_plan_offline_counts_the_h100s_each_profile_needs_for_1_2_4_and_8(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    for count in (1, 2, 4, 8):
        prof = _plan(name, f"h100x{count}", capsys)
        needs = {r["scheme"]: r["gpus_needed"] for r in prof["gpus_needed"]}
        assert {k: needs[k] for k in EXPECTED_GPUS[name]} == EXPECTED_GPUS[name]
        for r in prof["gpus_needed"]:
            assert r["fits_host"] == (r["runnable"] and r["gpus_needed"] is not None and r["gpus_needed"] <= count)
        # every scheme converts except quantized mixtures of experts (the hf layout writes Mixtral in 16 bits)
        convertible = {k: v for k, v in EXPECTED_GPUS[name].items() if not name.startswith("mixtral") or k == "bf16"}
        assert prof["host_can_hold"] == (min(convertible.values()) <= count)
        chosen = next((c for c in prof["candidates"] if c["name"] == prof["chosen"]), None)
        if prof["host_can_hold"]:
            assert chosen is not None and chosen["ok"] and chosen["gpus"] <= count
        else:
            assert prof["chosen"] is None and prof["error"]["exit_code"] == 6


def test_plan_says_plainly_when_one_h100_cannot_hold_mixtral_8x22b(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["plan", "mixtral-8x22b-v0.1", "--offline", "--target", "h100"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "1 x h100 cannot hold mixtral-8x22b-v0.1 under any scheme" in text
    assert "bf16-mistral   4 GPUs" in text


def test_plan_for_h100x4_shows_bf16_8x22b_on_four_gpus_and_picks_a_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["plan", "mixtral-8x22b-v0.1", "--offline", "--target", "h100x4"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "bf16-mistral-tp4" in text and "<- chosen" in text and "cannot hold" not in text


def test_a_fetched_params_json_still_wins_over_the_manifest_params(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "params.json"
    p.write_text(json.dumps({"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4,
                             "n_kv_heads": 2, "norm_eps": 1e-5, "vocab_size": 32000}))
    prof = _plan("mixtral-8x22b-v0.1", "h100", capsys, "--params", str(p))
    assert prof["params"] == str(p) and prof["host_can_hold"]


# ---------------------------------------------------------------------------------------
# the 8x7B torrent's pickle: imported under its md5 taken from a manifest


def _tiny_8x7b_torrent(tmp_path: Path) -> tuple[Path, str]:
    """A folder shaped like the 8x7B torrent (consolidated.00.pth, params.json without rope_theta,
    tokenizer.model) at tiny dims, and the pickle's md5."""
    import hashlib
    import io

    import torch

    from provision.testing.tiny import tiny_state_dict
    from provision.testing.tiny_large import TINY_MIXTRAL_PARAMS

    params = {k: v for k, v in TINY_MIXTRAL_PARAMS.items() if k != "rope_theta"}
    d = tmp_path / "mixtral-8x7b-32kseqlen"
    d.mkdir()
    buf = io.BytesIO()
    torch.save(tiny_state_dict(ModelArgs.from_dict(params), 0), buf)
    (d / "consolidated.00.pth").write_bytes(buf.getvalue())
    (d / "params.json").write_text(json.dumps(params))
    shutil.copy(_v1_tokenizer(), d / "tokenizer.model")
    return d, hashlib.md5(buf.getvalue(), usedforsecurity=False).hexdigest()


def _pickle_manifest(tmp_path: Path, md5: str) -> Path:
    p = tmp_path / "tiny-8x7b.toml"
    p.write_text('schema_version = 1\nname = "tiny-8x7b"\narchitecture = "mixtral"\nformat = "mistral"\n'
                 '[[sources]]\ntype = "torrent"\nmagnet = "magnet:?xt=urn:btih:' + "5" * 40 + '"\n'
                 f'[[files]]\npath = "consolidated.00.pth"\nmd5 = "{md5}"\noptional = true\npickle = true\n')
    return p


@pytest.mark.slow  # 2-4.5 s: the import runs in a child process that loads torch, then a model is built
def test_import_pickle_takes_the_md5_from_the_manifest_and_writes_rope_1e6_for_a_moe(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, md5 = _tiny_8x7b_torrent(tmp_path)
    out = tmp_path / "out"
    assert run_cli(["import-pickle", str(src), "--out", str(out), "--manifest",
                    str(_pickle_manifest(tmp_path, md5)), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["authority"] == "md5" and res["source_md5"] == md5 and res["rope_theta_added"]
    assert json.loads((out / "params.json").read_text())["rope_theta"] == 1e6
    from provision.model.loader import load_model

    _model, args = load_model(out, device="cpu")
    assert args.moe is not None and args.rope_theta_value == 1e6


def test_import_pickle_refuses_a_pickle_whose_md5_is_not_the_manifests(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, md5 = _tiny_8x7b_torrent(tmp_path)
    out = tmp_path / "out"
    wrong = ("0" if md5[0] != "0" else "1") + md5[1:]
    assert run_cli(["import-pickle", str(src), "--out", str(out), "--manifest",
                    str(_pickle_manifest(tmp_path, wrong))]) == 5
    assert "md5" in capsys.readouterr().err and not out.exists()
