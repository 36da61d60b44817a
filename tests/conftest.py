"""Fixtures every test area may use.

* ``_no_leaks`` (through ``_isolated_env``): a test that leaves an environment variable provision or
  huggingface_hub reads, the working folder or the umask changed fails at teardown (a subprocess a
  later test starts would inherit it);
* ``_isolated_env`` (autouse): each test gets its own PROVISION_HOME and HF_HOME (huggingface_hub's
  token and cache paths, computed once per process, follow it), no Hugging Face credentials or
  telemetry, a dead HF endpoint and the closed BitTorrent network mode;
* ``tiny_src`` / ``tiny_copy``: the tiny Pixtral checkpoint, written once per session (read-only),
  and a private writable copy of it;
* ``tiny_7b`` / ``tiny_nemo``: tiny text-only Mistral checkpoints (session-scoped, read-only): the
  7B-like one has no rope_theta, a sliding window of 8 and the SentencePiece v1 tokenizer; the
  NeMo-like one rope_theta 1e6 and tekken (model, convert and formats tests); ``tiny_7b_pickle``:
  the 7B-like one with its weights pickled, as the torrent ships them (convert tests);
* ``hub``: a loopback Hugging Face Hub serving the tiny checkpoint, HF_ENDPOINT pointing at it
  (fetch and formats tests).

Fixtures one area uses live in ``tests/<area>/conftest.py``; helpers that are not fixtures live in
``tests/support`` (or ``provision.testing`` when benchmarks share them).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from provision.testing.hub_server import LoopbackHub


# what a test must leave as it found it: the environment variables provision, huggingface_hub and
# the terminal read (a subprocess a later test starts inherits them), the working folder, the umask
_GUARDED_PREFIXES = ("PROVISION_", "HF_", "HUGGINGFACE_")
_GUARDED_NAMES = frozenset({"NO_COLOR", "FORCE_COLOR", "TERM", "COLUMNS", "LINES", "CI", "HOME", "TMPDIR",
                            "PYTHONPATH", "XDG_CACHE_HOME", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
                            "http_proxy", "https_proxy", "all_proxy", "no_proxy"})


def _process_state() -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k.startswith(_GUARDED_PREFIXES) or k in _GUARDED_NAMES}
    mask = os.umask(0o022)
    os.umask(mask)
    return {"environ": env, "cwd": os.getcwd(), "umask": oct(mask)}


@pytest.fixture()
def _no_leaks() -> Iterator[None]:
    """Fails (at teardown) a test that leaves the process state above changed: set up before, and
    so checked after, ``_isolated_env``'s monkeypatch has undone its own changes."""
    before = _process_state()
    yield
    after = _process_state()
    changed: dict[str, Any] = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if "environ" in changed:
        b, a = changed["environ"]
        assert isinstance(b, dict) and isinstance(a, dict)
        changed["environ"] = {k: (b.get(k), a.get(k)) for k in b.keys() | a.keys() if b.get(k) != a.get(k)}
        for k, (was, _) in changed["environ"].items():  # put it back: the next test starts clean
            if was is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(was)
    if "cwd" in changed:
        os.chdir(str(before["cwd"]))
    if "umask" in changed:
        os.umask(int(str(before["umask"]), 8))
    assert not changed, f"the test left process state changed (before, after): {changed}"


@pytest.fixture(autouse=True)
def _isolated_env(_no_leaks: None, tmp_path_factory: pytest.TempPathFactory,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own PROVISION_HOME and no Hugging Face credentials or telemetry."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("PROVISION_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_ASSETS_CACHE", "HF_XET_CACHE"):
        monkeypatch.delenv(var, raising=False)  # everything follows this test's HF_HOME
    _follow_hf_home(monkeypatch, home / "hf")
    # a dead loopback port: a test that forgets to start its hub fails fast instead of leaving the machine
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("PROVISION_DEBUG", raising=False)
    monkeypatch.setenv("PROVISION_PROGRESS_INTERVAL", "0.2")
    # BitTorrent in tests is always the closed network mode (no DHT/LSD/UPnP/NAT-PMP, loopback):
    # a test that forgets --network closed can never reach a public tracker or the DHT.
    monkeypatch.setenv("PROVISION_NETWORK", "closed")
    monkeypatch.setenv("PROVISION_FORBID_PUBLIC_NETWORK", "1")
    # smoke and run default to our engine alone: a vLLM server takes a minute to start, so only the
    # tests that ask for it (tests/vllm, --engine) start one, even where vLLM is installed (CI)
    monkeypatch.setenv("PROVISION_SMOKE_ENGINE", "provision")


# huggingface_hub constants derived from HF_HOME (the paths below it)
_HF_HOME_PATHS = {"HF_HOME": "", "HF_HUB_CACHE": "hub", "HUGGINGFACE_HUB_CACHE": "hub", "HF_ASSETS_CACHE": "assets",
                  "HUGGINGFACE_ASSETS_CACHE": "assets", "HF_TOKEN_PATH": "token",
                  "HF_STORED_TOKENS_PATH": "stored_tokens", "HF_XET_CACHE": "xet"}


def _follow_hf_home(monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> None:
    """huggingface_hub computes its token and cache paths from HF_HOME once per process, at import:
    point them at this test's HF_HOME, so no test reads another's (or the user's) saved token."""
    from huggingface_hub import constants

    for name, rel in _HF_HOME_PATHS.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, str(hf_home / rel) if rel else str(hf_home))


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint, written once per session. Treat it as read-only: copy it to modify."""
    from provision.testing.tiny import write_tiny

    out = tmp_path_factory.mktemp("tiny") / "tiny-pixtral"
    write_tiny(out, seed=0)
    return out


@pytest.fixture()
def tiny_copy(tiny_src: Path, tmp_path: Path) -> Iterator[Path]:
    """A private, writable copy of the tiny checkpoint."""
    dst = tmp_path / "tiny-pixtral"
    shutil.copytree(tiny_src, dst)
    yield dst


def _tiny_mistral(tmp_path_factory: pytest.TempPathFactory, kind: str, weights: str = "safetensors") -> Path:
    """A tiny text-only Mistral checkpoint (``kind`` 7b or nemo) with its weights as ``weights``."""
    from provision.testing.tiny_text import write_tiny_mistral

    out = tmp_path_factory.mktemp(f"tiny-{kind}-{weights}") / f"tiny-mistral-{kind}"
    write_tiny_mistral(out, kind, seed=0, weights=weights)
    return out


@pytest.fixture(scope="session")
def tiny_7b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_mistral(tmp_path_factory, "7b")


@pytest.fixture(scope="session")
def tiny_nemo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_mistral(tmp_path_factory, "nemo")


@pytest.fixture(scope="session")
def tiny_7b_pickle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 7B-like checkpoint with its weights as ``consolidated.00.pth`` (as the torrent ships them)."""
    return _tiny_mistral(tmp_path_factory, "7b", "pickle")


@pytest.fixture()
def hub(tiny_src: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackHub]:
    """The tiny checkpoint served as ``provision/tiny-pixtral`` (its manifest revision, ``main``);
    HF_ENDPOINT points at it. Tokens: ``provision.testing.hub_server.TOKENS`` (alice, bob)."""
    from provision.testing.hub_server import TOKENS, serve_tiny

    with serve_tiny(tiny_src, tokens=TOKENS) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield h
