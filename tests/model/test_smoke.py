"""The smoke test (library and `provision smoke`): checks, report, golden ids, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from provision.cli.main import run_cli
from provision.errors import SmokeError
from provision.formats.manifest import load_manifest, write_manifest
from provision.model import loader
from provision.stages.smoke import image_layout_ok, smoke
from tests.support.hf_reference import GOLDEN, load_golden

REPO = Path(__file__).resolve().parents[2]


def _json_out(capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    out = capsys.readouterr().out
    doc: dict = json.loads(out)  # type: ignore[type-arg]
    return doc


def test_golden_ids_belong_to_this_tiny_checkpoint(tiny_src: Path) -> None:
    """If the tiny writer changes, regenerate the golden ids (tests/golden/make_golden.py)."""
    from provision.io.hashing import sha256_file

    assert sha256_file(tiny_src / "consolidated.safetensors") == load_golden()["consolidated_sha256"]


def test_smoke_on_the_tiny_checkpoint_generates_the_golden_ids(tiny_src: Path) -> None:
    golden = load_golden()["token_ids"]
    rep = smoke(tiny_src, device="cpu", golden=golden)
    assert rep.passed
    assert rep.token_ids == golden
    assert {c.name for c in rep.checks} == {"logits_finite", "image_tokens", "decodes", "golden"}
    assert rep.device == "cpu" and rep.dtype == "float32" and rep.layout == "mistral"
    assert rep.tokens_generated == 8 and isinstance(rep.text, str)
    assert rep.images[0]["patches"] == [3, 4]
    assert rep.load_seconds > 0 and rep.prefill_seconds > 0 and rep.per_token_seconds
    assert rep.peak_ram_bytes > 0 and rep.peak_gpu_bytes is None
    assert rep.manifest == str(tiny_src / "manifest.toml")
    d = rep.to_dict()
    json.dumps(d)
    assert d["passed"] is True and d["checks"][0]["name"] == "logits_finite"


def test_the_transformers_layout_passes_the_same_golden_check(tiny_src: Path, tmp_path: Path) -> None:
    from tests.support.hf_reference import write_hf_copy

    hf = write_hf_copy(tiny_src, tmp_path / "hf", dtype="bfloat16")
    rep = smoke(hf, device="cpu", manifest=tiny_src / "manifest.toml", golden=load_golden()["token_ids"])
    assert rep.passed and rep.layout == "hf"


def test_wrong_golden_ids_fail_the_smoke_test_with_exit_8_and_the_report(tiny_src: Path) -> None:
    with pytest.raises(SmokeError) as ei:
        smoke(tiny_src, device="cpu", golden=[5, 6, 7])
    assert ei.value.exit_code == 8
    rep = ei.value.context["report"]
    assert rep["passed"] is False
    assert [c["name"] for c in rep["checks"] if not c["passed"]] == ["golden"]


def test_an_expected_answer_missing_from_the_output_fails_with_exit_8(
        tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = load_manifest(tiny_copy / "manifest.toml")
    write_manifest(replace(m, smoke=replace(m.smoke, expected="red")), tiny_copy / "manifest.toml")
    assert run_cli(["smoke", str(tiny_copy), "--device", "cpu", "--json"]) == 8
    doc = _json_out(capsys)
    assert doc["ok"] is False and doc["exit_code"] == 8
    assert doc["error"]["kind"] == "smoke" and "expected" in doc["error"]["message"]
    failed = [c for c in doc["smoke"]["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == ["expected"] and "'red' not found" in failed[0]["detail"]


def test_cli_smoke_json_report_with_golden_file(tiny_src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["smoke", str(tiny_src), "--device", "cpu", "--golden", str(GOLDEN), "--json"]) == 0
    doc = _json_out(capsys)
    assert doc["ok"] is True and doc["command"] == "smoke"
    assert doc["manifest_sha256"] == load_manifest(tiny_src / "manifest.toml").sha256
    s = doc["smoke"]
    for key in ("device", "dtype", "load_seconds", "prefill_seconds", "per_token_seconds", "peak_ram_bytes",
                "peak_gpu_bytes", "tokens_generated", "text", "checks", "prefill_tokens_per_second"):
        assert key in s
    assert s["token_ids"] == load_golden()["token_ids"]


def test_cli_custom_image_prompt_and_max_tokens(tiny_src: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.new("RGB", (40, 20), "blue").save(a)
    Image.new("RGB", (17, 33), "green").save(b)
    code = run_cli(["smoke", str(tiny_src), "--device", "cpu", "--image", str(a), "--image", str(b),
                    "--prompt", "Which colours?", "--max-tokens", "3", "--json"])
    assert code == 0
    s = _json_out(capsys)["smoke"]
    assert s["tokens_generated"] <= 3 and s["prompt"] == "Which colours?"
    assert [im["patches"] for im in s["images"]] == [[2, 3], [3, 2]]


def test_missing_image_file_is_a_usage_error(tiny_src: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(["smoke", str(tiny_src), "--device", "cpu", "--image", str(tmp_path / "nope.png"), "--json"])
    assert code == 2
    doc = _json_out(capsys)
    assert doc["ok"] is False and "does not exist" in doc["error"]["message"]


def test_corrupt_image_file_is_a_usage_error(tiny_src: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert run_cli(["smoke", str(tiny_src), "--device", "cpu", "--image", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a readable image" in err and "Traceback" not in err


def test_weights_too_big_for_the_device_exit_6_with_needed_and_free(
        tiny_src: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(loader, "free_device_bytes", lambda device: 10 * 2**20)
    assert run_cli(["smoke", str(tiny_src), "--device", "cpu", "--json"]) == 6
    err = _json_out(capsys)["error"]
    assert err["kind"] == "resources"
    assert err["context"]["free_bytes"] == 10 * 2**20
    assert err["context"]["needed_bytes"] > 68 * 10**6  # float32 weights + KV cache + reserve
    assert "GiB" in err["message"]


def test_missing_model_folder_is_exit_5(tmp_path: Path) -> None:
    assert run_cli(["smoke", str(tmp_path / "absent"), "--device", "cpu"]) == 5


def test_missing_tokenizer_is_a_structure_error(tiny_copy: Path) -> None:
    (tiny_copy / "tekken.json").unlink()
    assert run_cli(["smoke", str(tiny_copy), "--device", "cpu"]) == 5


def test_bad_golden_file_is_a_usage_error(tiny_src: Path, tmp_path: Path) -> None:
    g = tmp_path / "g.json"
    g.write_text('{"token_ids": "nope"}')
    assert run_cli(["smoke", str(tiny_src), "--golden", str(g)]) == 2


def test_max_tokens_out_of_range_is_a_usage_error(tiny_src: Path) -> None:
    assert run_cli(["smoke", str(tiny_src), "--max-tokens", "0"]) == 2


def test_image_layout_check_catches_a_wrong_count_and_a_wrong_layout() -> None:
    good = [1, 3, 10, 10, 12, 10, 10, 13, 4]
    assert image_layout_ok(good, [(2, 2)])[0]
    assert not image_layout_ok(good, [(2, 3)])[0]
    assert not image_layout_ok([1, 3, 10, 10, 13, 10, 10, 12, 4], [(2, 2)])[0]


def test_smoke_help_imports_no_torch() -> None:
    code = ("import sys\nfrom provision.cli.main import run_cli\nrun_cli(['smoke', '--help'])\n"
            "assert 'torch' not in sys.modules and 'mistral_common' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "--image" in r.stdout


def test_a_text_only_checkpoint_is_smoke_tested_without_an_image(tmp_path: Path) -> None:
    from provision.testing.tiny import TINY_PARAMS, write_tiny

    params = {k: v for k, v in TINY_PARAMS.items() if k != "vision_encoder"}
    d = tmp_path / "text-only"
    write_tiny(d, params=params)
    rep = smoke(d, device="cpu")
    assert rep.passed and rep.images == []
    assert [c.name for c in rep.checks] == ["logits_finite", "decodes"]
    assert run_cli(["smoke", str(d), "--image", str(tmp_path / "x.png")]) == 2


@pytest.mark.gpu
def test_smoke_on_a_cuda_gpu_in_bf16(tiny_src: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    rep = smoke(tiny_src, device="cuda")
    assert rep.passed and rep.dtype == "bfloat16" and rep.device.startswith("cuda")
    assert rep.peak_gpu_bytes is not None and rep.peak_gpu_bytes > 0
