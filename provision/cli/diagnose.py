"""The checks behind ``provision doctor``: what this host has and what a run here would need.

Each check returns one ``Check`` (name, ok/warn/fail, what was found, and the fix when it is not
ok): the GPUs and their driver, torch and whether it is a CUDA build, free disk under the home,
the store's state, libtorrent, vLLM, the Hugging Face token (whether one is present, never its
value), the network mode and, unless it is closed or offline, whether the Hub endpoint and the
trackers answer (each within ``timeout`` seconds). The checks never write into the store, never
start a BitTorrent session and never download anything; ``commands/doctor.py`` renders them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import secrets
import socket
import struct
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from provision.hardware import Hardware, detect

Status = Literal["ok", "warn", "fail"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail")

# Pixtral 12B's original (25.4 GB) plus an fp8 copy of it (about 13 GB), rounded up: below this a
# run of the README's model cannot keep both.
DISK_WARN_BYTES = 40 * 10**9
DISK_FAIL_BYTES = 1 * 10**9
_UDP_CONNECT_MAGIC = 0x41727101980  # BEP 15: the protocol id of a UDP tracker's connect request


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    status: Status
    detail: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_gpus(hw: Hardware, driver: str | None) -> Check:
    """GPUs seen through NVML or nvidia-smi, and the driver version."""
    if not hw.gpus:
        return Check("gpu", "warn", f"no NVIDIA GPU detected ({hw.cpu_count} CPU cores)",
                     "Install the NVIDIA driver (nvidia-smi must list the GPUs); without a GPU only CPU targets "
                     "(--target cpu, tiny models) run here.")
    names = ", ".join(sorted({g.name for g in hw.gpus}))
    return Check("gpu", "ok", f"{hw.describe()} [{names}] via {hw.source}; driver {driver or 'unknown'}")


def driver_version() -> str | None:
    """The NVIDIA driver version through NVML, or None when NVML cannot load."""
    try:
        pynvml: Any = importlib.import_module("pynvml")
        pynvml.nvmlInit()
    except Exception:  # no pynvml, no driver library, no device: no version to report
        return None
    try:
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # an NVML call that fails leaves the version unknown
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # the version is read (or unknown) either way
            pass


def check_torch(has_gpu: bool) -> Check:
    """torch's version, whether it is a CUDA build and whether it sees the GPU."""
    try:
        torch: Any = importlib.import_module("torch")
    except ImportError:
        return Check("torch", "fail", "torch is not installed",
                     "Install provision's dependencies: pip install -e . (torch comes with them).")
    cuda = getattr(torch.version, "cuda", None)
    if cuda is None:
        status: Status = "fail" if has_gpu else "ok"
        return Check("torch", status, f"torch {torch.__version__}, a CPU-only build",
                     "Install a CUDA build of torch (https://pytorch.org/get-started/locally/)." if has_gpu else None)
    usable = bool(torch.cuda.is_available())
    if has_gpu and not usable:
        return Check("torch", "fail", f"torch {torch.__version__} (CUDA {cuda}) cannot use the GPU",
                     "Match the torch build's CUDA version to the driver (nvidia-smi shows the highest it supports).")
    return Check("torch", "ok", f"torch {torch.__version__}, CUDA {cuda} build"
                 + (f", {torch.cuda.device_count()} GPU(s) usable" if usable else ""))


def check_disk(home: Path, free: Callable[[Path], int]) -> Check:
    """Free space under the home (the nearest existing folder when the home is not made yet)."""
    from provision.io.space import nearest_existing
    from provision.units import human_bytes

    where = nearest_existing(home)
    n = free(where)
    detail = f"{human_bytes(n)} free under {home}"
    if n < DISK_FAIL_BYTES:
        return Check("disk", "fail", detail, "Free space there or point PROVISION_HOME (--home) at a larger disk.")
    if n < DISK_WARN_BYTES:
        return Check("disk", "warn", detail + f" (under {human_bytes(DISK_WARN_BYTES)}: too little for "
                     "Pixtral 12B and a converted copy)",
                     "Free space there or point PROVISION_HOME (--home) at a larger disk.")
    return Check("disk", "ok", detail)


def check_store(home: Path) -> Check:
    """The store's models and locks (``provision ls`` in one line)."""
    from provision.store.inventory import list_models

    if not home.exists():
        return Check("store", "ok", f"{home} does not exist yet (the first run creates it)")
    if not os.access(home, os.W_OK | os.X_OK):
        return Check("store", "fail", f"{home} is not writable by this user",
                     "Fix its permissions or point PROVISION_HOME (--home) elsewhere.")
    models = list_models(home)
    live = [m.name for m in models if m.lock.state == "live"]
    stale = [m.name for m in models if m.lock.state == "stale"]
    warnings = [w for m in models for w in m.warnings]
    detail = f"{len(models)} model(s) in {home}" + (f"; in use by a run: {', '.join(live)}" if live else "")
    if stale:
        return Check("store", "warn", detail + f"; dead locks: {', '.join(stale)}",
                     "Run provision gc to remove the dead locks.")
    if warnings:
        return Check("store", "warn", detail + f"; {warnings[0]}", "Run provision ls for the details.")
    return Check("store", "ok", detail)


def check_module(name: str, dist: str, *, need: Status, why: str, fix: str) -> Check:
    """Whether ``name`` can be imported (found, not loaded, for heavy ones) and its version."""
    import importlib.util

    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return Check(name, need, f"{name} is not installed ({why})", fix)
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "version unknown"
    return Check(name, "ok", f"{name} {version}")


def check_smoke_engine() -> Check:
    """Which engine ``provision smoke`` / ``run`` would judge with here (``smoke_vllm.engine_choice``),
    for text-only and for vision models (vLLM's Pixtral path also needs torchvision)."""
    from provision.errors import UsageError
    from provision.stages.smoke_vllm import engine_choice, vision_available, vllm_available

    try:
        engine, why = engine_choice()
    except UsageError as e:
        return Check("smoke-engine", "fail", str(e), "set PROVISION_SMOKE_ENGINE to provision, vllm or both.")
    ok, version = vllm_available()
    vision = engine
    if engine == "both" and why != "PROVISION_SMOKE_ENGINE" and not vision_available()[0]:
        vision = "provision"
    detail = (f"smoke uses {engine} for text-only models, {vision} for vision models "
              f"({why if why == 'PROVISION_SMOKE_ENGINE' else version})")
    return Check("smoke-engine", "ok", detail,
                 None if ok else "pip install 'provision[vllm]' (README: Judging with vLLM) to judge with vLLM too.")


def check_libtorrent() -> Check:
    try:
        lt: Any = importlib.import_module("libtorrent")
    except ImportError:
        return Check("libtorrent", "fail", "libtorrent is not installed (torrent sources cannot be fetched)",
                     "pip install libtorrent (provision's dependencies include it).")
    return Check("libtorrent", "ok", f"libtorrent {getattr(lt, '__version__', getattr(lt, 'version', '?'))}")


def check_token(token: str | None) -> Check:
    """Whether a Hugging Face token is present; the value is never part of the result."""
    if token:
        return Check("hf-token", "ok", "a Hugging Face token is present (not shown)")
    return Check("hf-token", "ok", "no Hugging Face token (public repositories only)")


def find_token() -> str | None:
    """HF_TOKEN, else the token ``hf auth login`` saved, else None."""
    from provision.stages.fetch.hub.env import resolve_token
    from provision.stages.fetch.request import HubOptions

    return resolve_token(HubOptions(token=os.environ.get("HF_TOKEN") or None))


def probe_http(url: str, timeout: float) -> str | None:
    """None when ``url``'s server answers HTTP at all (any status), else why not."""
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "provision-doctor"})
    try:
        with urllib.request.urlopen(req, timeout=timeout):  # http(s) URLs only: the caller checks
            return None
    except urllib.error.HTTPError:  # an HTTP answer (404, 401...) is an answer
        return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return str(reason) or type(e).__name__


def probe_tracker(url: str, timeout: float) -> str | None:
    """None when the tracker answers (HTTP: a TCP connection; UDP: a BEP 15 connect reply), else why not."""
    u = urllib.parse.urlsplit(url)
    if u.scheme in ("http", "https"):
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
            with socket.create_connection((u.hostname or "", port), timeout=timeout):
                return None
        except (OSError, ValueError) as e:
            return str(e) or type(e).__name__
    if u.scheme == "udp":
        tid = secrets.randbits(32)
        try:
            if u.port is None:
                return "no port in the URL"
            with socket.socket(socket.AF_INET6 if ":" in (u.hostname or "") else socket.AF_INET,
                               socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.sendto(struct.pack(">QII", _UDP_CONNECT_MAGIC, 0, tid), (u.hostname or "", u.port))
                data, _ = s.recvfrom(64)
        except (OSError, ValueError) as e:
            return str(e) or type(e).__name__
        if len(data) >= 16 and struct.unpack(">II", data[:8]) == (0, tid):
            return None
        return "the reply is not a BEP 15 connect response"
    return f"unsupported tracker scheme {u.scheme!r}"


def check_network(mode: str, offline: bool, endpoint: str, trackers: Iterable[str], timeout: float,
                  ) -> list[Check]:
    """The network mode, then the Hub endpoint and each tracker (skipped when closed or offline)."""
    tr = list(trackers)
    out = [Check("network", "ok", f"BitTorrent network mode {mode}" + ("; offline" if offline else ""))]
    if offline or mode == "closed":
        why = "offline" if offline else "closed network mode"
        out.append(Check("hub", "ok", f"{endpoint} not checked ({why})"))
        out.append(Check("tracker", "ok", f"not checked ({why})" + (
            "" if offline else "; closed mode uses only the --peer and --tracker given")))
        return out
    err = probe_http(endpoint, timeout) if endpoint.startswith(("http://", "https://")) else "not an http(s) URL"
    out.append(Check("hub", "ok", f"{endpoint} answers") if err is None else
               Check("hub", "warn", f"{endpoint} does not answer within {timeout:g} s: {err}",
                     "Check the network, proxies (HTTPS_PROXY) and HF_ENDPOINT; torrent sources still work."))
    if not tr:
        out.append(Check("tracker", "ok", "no tracker to check (pass --tracker URL)"))
    for url in tr:
        terr = probe_tracker(url, timeout)
        out.append(Check("tracker", "ok", f"{url} answers") if terr is None else
                   Check("tracker", "warn", f"{url} does not answer within {timeout:g} s: {terr}",
                         "Check that UDP/TCP to the tracker is allowed; DHT and --peer still find peers."))
    return out


def run_checks(*, home: Path, mode: str, offline: bool, endpoint: str, trackers: Iterable[str], timeout: float,
               free: Callable[[Path], int] | None = None, hardware: Hardware | None = None) -> list[Check]:
    """Every check, in the order the doctor prints them."""
    from provision.io.space import free_bytes

    hw = hardware if hardware is not None else detect()
    checks = [check_gpus(hw, driver_version() if hw.gpus else None), check_torch(hw.has_gpu),
              check_disk(home, free or free_bytes), check_store(home), check_libtorrent(),
              check_module("vllm", "vllm", need="warn", why="needed only to serve the converted model",
                           fix="pip install vllm on the host that serves the model."),
              check_smoke_engine(), check_token(find_token())]
    checks += check_network(mode, offline, endpoint, trackers, timeout)
    return checks


__all__ = ["DISK_FAIL_BYTES", "DISK_WARN_BYTES", "STATUSES", "Check", "Status", "check_disk", "check_gpus",
           "check_network", "check_store", "check_token", "check_torch", "driver_version", "find_token",
           "probe_http", "probe_tracker", "run_checks"]
