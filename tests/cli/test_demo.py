"""The README's demo path end to end: tiny -> seed on loopback -> run by magnet -> fp8 -> smoke."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from provision.cli.demo import main
from provision.formats.report_schema import validate_report


@pytest.mark.slow
def test_demo_fetches_the_tiny_model_over_bittorrent_converts_to_fp8_and_passes_the_smoke_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--keep", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    validate_report(doc)
    stages = {s["stage"]: s for s in doc["stages"]}
    assert stages["fetch"]["result"] == "ok" and stages["fetch"]["details"]["how"] == "torrent"
    assert stages["fetch"]["bytes"] > 50_000_000  # the bytes really came over BitTorrent
    assert stages["convert"]["profile"] == "fp8-hf"
    assert stages["smoke"]["details"]["passed"] is True
    assert doc["plan"]["sources"][0].startswith("btih:")
    out = Path(doc["profile_dir"])
    assert (out / "config.json").is_file()
    assert "float-quantized" in (out / "config.json").read_text()


@pytest.mark.slow
def test_the_human_demo_prints_run_s_result_on_stdout_and_one_truthful_line_per_finished_task_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shlex

    from provision.cli.console import Terminal

    assert not Terminal().is_tty  # captured: the plain (no TTY) progress lines
    assert main(["--keep", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    # stdout: run's result only (the table and the serve line), not tiny's file list
    assert "sha256" not in out and "tekken.json" not in out
    serve = [ln for ln in out.splitlines() if ln.startswith("serve it with: ")]
    assert len(serve) == 1
    out_dir = tmp_path / "home" / "models" / "tiny-pixtral-demo" / "fp8-hf"
    assert shlex.split(serve[0].removeprefix("serve it with: "))[:3] == ["vllm", "serve", str(out_dir)]
    # stderr: each finished task once, in its own unit; the torrent's size is the files' real size
    size = sum((tmp_path / "tiny-pixtral" / n).stat().st_size
               for n in ("consolidated.safetensors", "params.json", "tekken.json"))
    assert [ln for ln in err.splitlines() if ln.startswith("torrent tiny-pixtral-demo: done, ")] == [
        ln for ln in err.splitlines() if ln.startswith(f"torrent tiny-pixtral-demo: done, {size / 1e6:.2f} MB")]
    assert sum(1 for ln in err.splitlines() if ln.startswith("torrent tiny-pixtral-demo: done, ")) == 1
    assert sum(1 for ln in err.splitlines() if ln.startswith("generating: done, 8 tokens")) == 1
    assert "\r" not in err and " done\n" not in err  # no redraws, no bare repeated "done" lines
