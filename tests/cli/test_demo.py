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
