"""`provision run --drop-original` keeps what a rerun needs: the same command again finds the verified,
converted profile and downloads nothing (the loopback hub's request log proves it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from provision.layout import Layout
from provision.store.state import load_state, save_state
from provision.testing.hub_server import LoopbackHub
from provision.testing.tiny import TINY_REPO
from tests.support.cli import cli_json, provision_home

RUN = ["run", f"hf://{TINY_REPO}", "--drop-original", "--no-hf-cache"]


def _stages(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["stage"], s["result"]) for s in doc["stages"]]


def _downloads(hub: LoopbackHub) -> list[str]:
    return [r.path for r in hub.requests if "/resolve/" in r.path or r.role == "cdn"]


@pytest.mark.slow
def test_a_rerun_after_drop_original_skips_fetch_and_convert_and_downloads_nothing(
        hub: LoopbackHub, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, err = cli_json(capsys, *RUN)
    assert code == 0, err
    assert _stages(doc)[-1] == ("drop-original", "ok")
    lay = Layout(provision_home())
    assert not lay.original(TINY_REPO).exists()
    profile_dir = Path(doc["profile_dir"])
    assert _downloads(hub)  # the first run did download

    hub.reset_counters()
    hub.requests.clear()
    code, again, err = cli_json(capsys, *RUN)
    assert code == 0, err
    assert _stages(again)[1:] == [("fetch", "skipped"), ("verify", "skipped"), ("convert", "skipped"),
                                  ("smoke", "skipped")]
    assert "drop-original" in again["stages"][1]["details"]["reason"]
    assert again["profile_dir"] == str(profile_dir)
    assert _downloads(hub) == [] and hub.sent("consolidated.safetensors") == 0
    assert not lay.original(TINY_REPO).exists()

    # only what is missing runs: a smoke record gone (say, a newer tool dropped it) is redone, nothing else
    state = load_state(lay.state_file(TINY_REPO))
    smoke = [k for k in state.stages if k.startswith("smoke:")]
    assert smoke
    for k in smoke:
        del state.stages[k]
    save_state(state, lay.state_file(TINY_REPO))
    code, third, err = cli_json(capsys, *RUN)
    assert code == 0, err
    assert _stages(third)[1:] == [("fetch", "skipped"), ("verify", "skipped"), ("convert", "skipped"),
                                  ("smoke", "ok")]
    assert _downloads(hub) == []


@pytest.mark.slow
def test_a_rerun_after_drop_original_asking_for_another_output_fetches_again(
        hub: LoopbackHub, capsys: pytest.CaptureFixture[str]) -> None:
    code, _doc, err = cli_json(capsys, *RUN)
    assert code == 0, err
    hub.requests.clear()
    code, doc, err = cli_json(capsys, "run", f"hf://{TINY_REPO}", "--no-hf-cache", "--skip-convert")
    assert code == 0, err  # the original is needed again (smoke on it): fetched, verified
    assert _stages(doc)[1:3] == [("fetch", "ok"), ("verify", "ok")]
    assert _downloads(hub)
    assert (Layout(provision_home()).original(TINY_REPO) / "params.json").is_file()
