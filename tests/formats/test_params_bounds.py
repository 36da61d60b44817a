"""params.json bounds: every count has a sane maximum, every divisor is at least 1, and a hostile
params.json (or a manifest's [params]) is a one-line exit 3 before anything is allocated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from provision.errors import HostileContentError, ParamsError
from provision.formats.params import MAX_TENSORS, TEXT_BOUNDS, ModelArgs, tensor_count, tensor_spec

REAL = Path(__file__).parents[1] / "data" / "pixtral-12b-params.json"
ROOT = Path(__file__).resolve().parents[2]

# Pixtral Large 2411 / Mistral Large 2 (../shared/reference/mistral-family.md §3 and §7)
PIXTRAL_LARGE: dict[str, Any] = {
    "dim": 12288, "n_layers": 88, "head_dim": 128, "hidden_dim": 28672, "n_heads": 96, "n_kv_heads": 8,
    "rope_theta": 1000000000.0, "norm_eps": 1e-05, "vocab_size": 32768,
    "vision_encoder": {"hidden_size": 1408, "num_channels": 3, "image_size": 1024, "patch_size": 16,
                       "rope_theta": 10000.0, "intermediate_size": 6144, "num_hidden_layers": 40,
                       "num_attention_heads": 16, "image_token_id": 10, "image_break_token_id": 14,
                       "image_end_token_id": 15, "adapter_bias": False},
}
MIXTRAL_8X22B: dict[str, Any] = {"dim": 6144, "n_layers": 56, "head_dim": 128, "hidden_dim": 16384, "n_heads": 48,
                                 "n_kv_heads": 8, "norm_eps": 1e-05, "vocab_size": 32768, "rope_theta": 1000000.0,
                                 "moe": {"num_experts": 8, "num_experts_per_tok": 2}}


def _real() -> dict[str, Any]:
    d: dict[str, Any] = json.loads(REAL.read_text())
    return d


def test_the_largest_mistral_models_are_inside_the_bounds() -> None:
    large = ModelArgs.from_dict(PIXTRAL_LARGE)
    # 3 + 88 layers x 9 + vision (2 + 40 x 9 + 2, no adapter bias) = 795 + 364
    assert tensor_count(large) == len(tensor_spec(large)) == 3 + 88 * 9 + 2 + 40 * 9 + 2
    moe = ModelArgs.from_dict(MIXTRAL_8X22B)
    # 3 + 56 layers x (6 + gate + 8 experts x 3)
    assert tensor_count(moe) == len(tensor_spec(moe)) == 3 + 56 * 31


def test_tensor_count_matches_the_spec_of_the_real_params() -> None:
    args = ModelArgs.from_file(REAL)
    assert tensor_count(args) == len(tensor_spec(args)) == 585


@pytest.mark.parametrize(("path", "value"), [
    (("n_layers",), 1_000_000_000),
    (("vision_encoder", "num_hidden_layers"), 1_000_000_000),
    (("dim",), 10**12),
    (("vocab_size",), 10**10),
    (("hidden_dim",), 10**9),
    (("n_heads",), 10**6),
    (("vision_encoder", "image_size"), 10**7),
])
def test_a_count_over_its_maximum_is_exit_3_naming_the_field(path: tuple[str, ...], value: int) -> None:
    d = _real()
    target = d
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    with pytest.raises(ParamsError) as e:
        ModelArgs.from_dict(d)
    assert e.value.exit_code == 3 and repr(path[-1]) in str(e.value) and "\n" not in str(e.value)


def test_a_billion_layers_is_refused_before_any_allocation() -> None:
    d = {**_real(), "n_layers": 1_000_000_000}
    tracemalloc.start()
    try:
        with pytest.raises(ParamsError, match="'n_layers'"):
            ModelArgs.from_dict(d)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # refused by arithmetic: not even a megabyte


def test_too_many_experts_times_layers_is_refused_by_the_tensor_count() -> None:
    # 512 layers x (7 + 3 x 512 experts) = 790,016 tensors > MAX_TENSORS, each count alone within bounds
    d = {**MIXTRAL_8X22B, "n_layers": 512, "moe": {"num_experts": 512, "num_experts_per_tok": 2}}
    assert 3 + 512 * (7 + 3 * 512) > MAX_TENSORS
    with pytest.raises(ParamsError, match="tensors"):
        ModelArgs.from_dict(d)


@pytest.mark.parametrize(("path", "field"), [
    (("n_heads",), "'n_heads'"),
    (("n_kv_heads",), "'n_kv_heads'"),
    (("vision_encoder", "patch_size"), "'patch_size'"),
    (("vision_encoder", "num_attention_heads"), "'num_attention_heads'"),
    (("vision_encoder", "spatial_merge_size"), "'spatial_merge_size'"),
    (("moe", "num_experts"), "'num_experts'"),
])
def test_a_zero_divisor_is_exit_3_naming_the_field(path: tuple[str, ...], field: str) -> None:
    d = {**_real(), "moe": {"num_experts": 8, "num_experts_per_tok": 2}}
    d.pop("head_dim")  # head_dim derived from dim / n_heads: the division itself must be guarded
    target = d
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = 0
    with pytest.raises(ParamsError) as e:
        ModelArgs.from_dict(d)
    assert e.value.exit_code == 3 and field in str(e.value)


@pytest.mark.parametrize("key", ["n_layers", "norm_eps", "rope_theta"])
def test_an_enormous_integer_is_exit_3_not_overflow(key: str) -> None:
    d = {**_real(), key: 10**400}
    with pytest.raises(ParamsError) as e:
        ModelArgs.from_dict(d)
    assert e.value.exit_code == 3 and repr(key) in str(e.value) and len(str(e.value)) < 300


def test_an_integer_of_thousands_of_digits_in_the_file_is_exit_3(tmp_path: Path) -> None:
    p = tmp_path / "params.json"
    p.write_text(REAL.read_text().replace('"n_layers": 40', '"n_layers": ' + "9" * 5000))
    assert "9" * 5000 in p.read_text()
    with pytest.raises(ParamsError) as e:
        ModelArgs.from_file(p)
    assert e.value.exit_code == 3


def test_infinite_floats_are_refused() -> None:
    with pytest.raises(ParamsError, match="'norm_eps'"):
        ModelArgs.from_dict({**_real(), "norm_eps": float("inf")})


def test_experts_per_token_above_the_experts_is_refused() -> None:
    with pytest.raises(ParamsError, match="num_experts_per_tok"):
        ModelArgs.from_dict({**MIXTRAL_8X22B, "moe": {"num_experts": 2, "num_experts_per_tok": 3}})


def test_an_image_token_outside_the_vocabulary_is_refused() -> None:
    d = _real()
    d["vocab_size"] = 11
    d["vision_encoder"]["image_break_token_id"] = 11
    with pytest.raises(ParamsError, match="image_break_token_id"):
        ModelArgs.from_dict(d)


def test_documented_bounds_cover_mistral_large_2() -> None:
    # Mistral Large 2 (123B): 88 layers, dim 12288, 96 heads, 8 kv heads, vocab 32768, hidden 28672
    for key, value in (("n_layers", 88), ("dim", 12288), ("n_heads", 96), ("n_kv_heads", 8),
                       ("vocab_size", 32768), ("hidden_dim", 28672)):
        lo, hi = TEXT_BOUNDS[key]
        assert lo <= value and value * 4 <= hi, key


def test_a_fifo_named_params_json_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "params.json")
    with pytest.raises(HostileContentError) as e:  # would block forever in open() without O_NONBLOCK
        ModelArgs.from_file(tmp_path / "params.json")
    assert e.value.exit_code == 5


def test_a_params_json_symlinked_out_of_its_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "params.json").symlink_to(REAL)
    with pytest.raises(HostileContentError):
        ModelArgs.from_file(tmp_path / "model" / "params.json")


# ------------------------------------------------------------------------------ through the CLI

_CHILD = r"""
import sys, tracemalloc
from provision.cli.main import run_cli
tracemalloc.start()
rc = run_cli(sys.argv[1:])
print("PEAK", tracemalloc.get_traced_memory()[1], file=sys.stderr)
sys.exit(rc)
"""


def _run_cli(*argv: str, home: Path) -> tuple[int, int, str]:
    """``provision ARGV`` in a child (bounded by a 120 s deadline): exit code, its traced peak, stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROVISION_HOME": str(home)}
    r = subprocess.run([sys.executable, "-c", _CHILD, *argv], env=env, capture_output=True, text=True, timeout=120)
    peaks = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("PEAK ")]
    return r.returncode, (peaks[0] if peaks else -1), r.stderr


def _billion_layers(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "params.json"
    p.write_text(json.dumps({**_real(), "n_layers": 1_000_000_000}))
    return p


def test_plan_with_a_billion_layer_params_exits_3_with_little_memory(tmp_path: Path) -> None:
    params = _billion_layers(tmp_path / "p")
    rc, peak, err = _run_cli("plan", "pixtral-12b-2409", "--offline", "--params", str(params), home=tmp_path / "h")
    assert rc == 3, err
    assert 0 < peak < 200 << 20, peak
    assert "n_layers" in err and "Traceback" not in err


def test_plan_with_a_manifest_carrying_a_billion_layers_exits_3(tmp_path: Path) -> None:
    from provision.formats.manifest import load_manifest, manifest_to_dict

    doc = manifest_to_dict(load_manifest("pixtral-12b-2409"))
    doc["params"] = {**_real(), "n_layers": 1_000_000_000}
    import tomli_w

    m = tmp_path / "m.toml"
    m.write_bytes(tomli_w.dumps(doc).encode())
    rc, peak, err = _run_cli("plan", str(m), "--offline", home=tmp_path / "h")
    assert rc == 3, err
    assert 0 < peak < 200 << 20, peak
    assert "n_layers" in err


def test_verify_of_a_folder_with_a_billion_layer_params_exits_3(tiny_src: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_src, folder)
    _billion_layers(folder)
    rc, peak, err = _run_cli("verify", str(folder), home=tmp_path / "h")
    assert rc == 3, err
    assert 0 < peak < 200 << 20, peak
    assert "n_layers" in err


def test_verify_with_zero_heads_exits_3_naming_the_field(tiny_src: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_src, folder)
    p = json.loads((folder / "params.json").read_text())
    p["n_kv_heads"] = 0
    (folder / "params.json").write_text(json.dumps(p))
    rc, _peak, err = _run_cli("verify", str(folder), home=tmp_path / "h")
    assert rc == 3, err
    assert "n_kv_heads" in err and "ZeroDivisionError" not in err


def test_plan_with_an_enormous_integer_exits_3(tmp_path: Path) -> None:
    p = tmp_path / "params.json"
    p.write_text(json.dumps({**_real(), "dim": 10**400}))
    rc, _peak, err = _run_cli("plan", "pixtral-12b-2409", "--offline", "--params", str(p), home=tmp_path / "h")
    assert rc == 3, err
    assert "OverflowError" not in err and "'dim'" in err


def test_verify_with_an_enormous_integer_exits_3(tiny_src: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_src, folder)
    p = json.loads((folder / "params.json").read_text())
    p["vocab_size"] = 10**400
    (folder / "params.json").write_text(json.dumps(p))
    rc, _peak, err = _run_cli("verify", str(folder), home=tmp_path / "h")
    assert rc == 3, err
    assert "OverflowError" not in err and "'vocab_size'" in err
