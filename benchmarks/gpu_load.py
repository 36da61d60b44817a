"""Benchmark: load a Pixtral-12B-shaped checkpoint to the GPU near the bus limit; fp8 decode on fp8 tensor cores.

Generates a random bf16 checkpoint with Pixtral 12B's real params.json (585 tensors, 25.37 GB of
tensor data; ``--scale`` shrinks layers and vocabulary), converts it to the fp8 profile with
``provision convert --scheme fp8 --layout hf``, reads both once so they sit in the page cache, then
measures in the same run, on one CUDA GPU:

* pinned host-to-device copy bandwidth (the bus; the peer every load is a fraction of);
* for the bf16 and the fp8 checkpoint: ``safetensors.torch.load_file(..., device="cuda")``, a
  streaming loader from PyPI where one is installed (fastsafetensors, runai-model-streamer; optional,
  ``pip install fastsafetensors`` first to include it), provision's previous loader (``safe_open``,
  tensor by tensor), and ours (``read_tensors_pipelined``, and the whole ``load_model``);
* decode ms/token: bf16, fp8 with ``torch._scaled_mm`` (``auto``: compute capability >= 8.9) and fp8
  with the dequantize kernel, and how far the two fp8 kernels' logits are apart;
* the wall time of a whole ``provision smoke`` of the fp8 profile (a fresh process).

Targets (exit 1 when one is missed): bf16 and fp8 ``load_model`` >= 10 GB/s and >= 2x load_file;
fp8 decode faster than bf16; fp8 smoke passes in <= 10 s. Sized to finish in under 5 minutes on one
H100/H200 (about 40 GB of disk and page cache). Without a CUDA GPU it exits 2 with a message.
``--dry-run`` runs every step on the CPU with a tiny checkpoint (targets not gated, it says so):
the test suite runs it so the script stays correct. Everything it writes is deleted at the end.

    .venv/bin/python benchmarks/gpu_load.py                      # on a GPU host, full size
    .venv/bin/python benchmarks/gpu_load.py --dry-run            # anywhere, seconds
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

PIXTRAL_12B = {
    "dim": 5120, "n_layers": 40, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
    "rope_theta": 1000000000.0, "norm_eps": 1e-05, "vocab_size": 131072,
    "vision_encoder": {"hidden_size": 1024, "num_channels": 3, "image_size": 1024, "patch_size": 16,
                       "rope_theta": 10000.0, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_token_id": 10},
}
LOAD_GBPS_TARGET = 10.0
LOAD_VS_LOAD_FILE_TARGET = 2.0
SMOKE_SECONDS_TARGET = 10.0


def scaled_params(scale: float) -> dict[str, Any]:
    p: dict[str, Any] = json.loads(json.dumps(PIXTRAL_12B))
    if scale < 1:
        p["n_layers"] = max(1, round(40 * scale))
        p["vocab_size"] = max(1024, int(131072 * scale) // 128 * 128)
        p["vision_encoder"]["num_hidden_layers"] = max(1, round(24 * scale))
    return p


def generate(src: Path, params: dict[str, Any]) -> int:
    """params.json, tekken.json and a random bf16 consolidated.safetensors (values drawn from a 128 MiB
    pool at shifting offsets, as benchmarks/convert_memory.py does); the file's size."""
    import torch

    from provision.formats.params import ModelArgs, tensor_spec
    from provision.formats.safetensors_writer import ShardWriter, TensorEntry
    from provision.testing.tiny import release_tekken_bytes

    src.mkdir(parents=True, exist_ok=True)
    (src / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    (src / "tekken.json").write_bytes(release_tekken_bytes())
    spec = tensor_spec(ModelArgs.from_dict(params))
    entries = [TensorEntry(k, "BF16", tuple(s)) for k, s in spec.items()]
    total = sum(e.nbytes for e in entries)
    g = torch.Generator().manual_seed(0)
    pool_n = min(64 << 20, max(1 << 16, total // 2))
    pool = (torch.randn(pool_n, generator=g) * 0.02).to(torch.bfloat16)
    raw = memoryview(pool.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
    w = ShardWriter(src / "consolidated.safetensors", entries, {"format": "pt"})
    step = min(32 << 20, len(raw) // 2)
    k = 0
    for e in entries:
        left = e.nbytes
        while left:
            n = min(step, left)
            off = (k * 7919 * 4096) % (len(raw) - n) // 2 * 2
            w.write(e.name, raw[off:off + n])
            left -= n
            k += 1
    w.finish()
    w.commit()
    return (src / "consolidated.safetensors").stat().st_size


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")


def read_through(paths: list[Path]) -> float:
    """Read every byte once (so the files sit in the page cache); seconds."""
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    for p in paths:
        with p.open("rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def run(cmd: list[str], what: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    return time.perf_counter() - t0, r


class Bench:
    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def free(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out

    def h2d_gbps(self, nbytes: int, rounds: int = 5) -> float:
        """Pinned host -> device copy bandwidth (a plain CPU copy with --dry-run), best of ``rounds``."""
        torch = self.torch
        pin = self.device.type == "cuda"
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        host.fill_(1)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dev.copy_(host, non_blocking=pin)
        times = [self.timed(lambda: dev.copy_(host, non_blocking=pin))[0] for _ in range(rounds)]
        return nbytes / min(times) / 1e9  # the buffers go with this frame; the caller frees the cache

    def load_file(self, paths: list[Path]) -> int:
        from safetensors.torch import load_file

        n = 0
        for p in paths:
            d = load_file(str(p), device=str(self.device))
            n += len(d)
            del d
        return n

    def peers(self) -> dict[str, Callable[[list[Path]], int]]:
        """The streaming loaders from PyPI that import here (none is a dependency of provision)."""
        out: dict[str, Callable[[list[Path]], int]] = {}
        try:
            import fastsafetensors  # type: ignore[import-not-found]

            def fst(paths: list[Path]) -> int:
                loader = fastsafetensors.SafeTensorsFileLoader(fastsafetensors.SingleGroup(), self.device,
                                                               nogds=True)
                try:
                    loader.add_filenames({0: [str(p) for p in paths]})
                    fb = loader.copy_files_to_device()
                    try:
                        keys = list(fb.key_to_rank_lidx.keys())
                        ts = [fb.get_tensor(k) for k in keys]
                        self.sync()
                        return len(ts)
                    finally:
                        fb.close()
                finally:
                    loader.close()

            out["fastsafetensors"] = fst
        except ImportError:
            pass
        try:
            from runai_model_streamer import SafetensorsStreamer  # type: ignore[import-not-found]

            def runai(paths: list[Path]) -> int:
                ts = []
                with SafetensorsStreamer() as streamer:
                    for p in paths:
                        streamer.stream_file(str(p))
                        for _name, t in streamer.get_tensors():
                            ts.append(t.to(self.device))  # the streamer reuses its buffer: copy now
                return len(ts)

            out["runai-model-streamer"] = runai
        except ImportError:
            pass
        return out

    def decode_ms(self, model: Any, tokens: int) -> float:
        from provision.model.pixtral import greedy_generate

        prompt = list(range(1000, 1032))
        greedy_generate(model, prompt, [], max_tokens=4, eos_id=None)  # warm-up: kernels, allocator
        res = greedy_generate(model, prompt, [], max_tokens=tokens, eos_id=None)
        return 1000 * statistics.median(res.step_seconds)

    def last_logits(self, model: Any) -> Any:
        with self.torch.no_grad():
            t = self.torch.tensor([list(range(1000, 1032))], device=self.device)
            return model(t, last_only=True).float().flatten()


def measure_loads(b: Bench, label: str, folder: Path, nbytes: int, peers: dict[str, Callable[[list[Path]], int]],
                  out: dict[str, Any], log: Callable[[str], None]) -> Any:
    """Every loader on one checkpoint; returns the model ``load_model`` built (kept for decoding)."""
    from provision.model.loader import load_model, open_checkpoint, read_tensors_pipelined

    files = weight_files(folder)
    res: dict[str, Any] = {"bytes": nbytes}

    def record(name: str, fn: Callable[[], Any]) -> Any:
        try:
            dt, value = b.timed(fn)
        except Exception as e:  # a peer that does not run here: say so, do not stop the benchmark
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            log(f"{label}: {name} failed: {res[name]['error']}")
            return None
        res[name] = {"seconds": round(dt, 4), "gbps": round(nbytes / dt / 1e9, 3)}
        log(f"{label}: {name:28s} {dt:8.3f} s  {nbytes / dt / 1e9:7.2f} GB/s")
        return value

    record("load_file", lambda: b.load_file(files))
    b.free()
    for name, fn in peers.items():
        record(name, lambda fn=fn: fn(files))  # type: ignore[misc]
        b.free()
    record("previous_loader", lambda: load_model(folder, device=str(b.device), pipelined=False))
    b.free()
    ckpt = open_checkpoint(folder)
    dtype = b.torch.bfloat16 if b.device.type == "cuda" else b.torch.float32
    record("ours_read_tensors", lambda: len(read_tensors_pipelined(ckpt, b.device, dtype)))
    b.free()
    model = record("ours_load_model", lambda: load_model(folder, device=str(b.device))[0])
    out[label] = res
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="where the work folder goes (default: a temp dir)")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink layers and vocab (1.0 = full 25 GB)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens to decode per measurement (default 32)")
    ap.add_argument("--dry-run", action="store_true",
                    help="run every step on the CPU with a tiny checkpoint; no target is gated")
    ap.add_argument("--report", type=Path, default=None, help="also write the figures as JSON to this file")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ns = ap.parse_args()
    if ns.tokens < 2:
        ap.error("--tokens must be at least 2")

    import torch

    if not ns.dry_run and not torch.cuda.is_available():
        print("gpu_load.py measures loading to a CUDA GPU and none is usable here; run it on a GPU host, or "
              "with --dry-run to check the script on the CPU (no targets).", file=sys.stderr)
        return 2
    device = "cpu" if ns.dry_run else "cuda"

    def log(msg: str) -> None:
        print(msg, flush=True)

    from provision.formats.params import ModelArgs, parameter_count
    from provision.model.quantized import kernels_used, set_fp8_kernel
    from provision.testing.tiny import TINY_PARAMS

    params = dict(TINY_PARAMS) if ns.dry_run else scaled_params(ns.scale)
    need = parameter_count(ModelArgs.from_dict(params)) * 2
    if ns.dir is not None:
        ns.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="provision-gpu-load-", dir=ns.dir))  # only this is removed
    src, fp8 = base / "bf16", base / "fp8"
    figures: dict[str, Any] = {"dry_run": ns.dry_run, "device": device, "scale": ns.scale}
    try:
        free = shutil.disk_usage(base).free
        if free < need * 1.6:
            print(f"not enough disk in {base}: need about {need * 1.6 / 1e9:.1f} GB, {free / 1e9:.1f} GB free",
                  file=sys.stderr)
            return 2
        b = Bench(device)
        if device == "cuda":
            figures["gpu"] = torch.cuda.get_device_name(0)
            figures["capability"] = list(torch.cuda.get_device_capability(0))
        dt = time.perf_counter()
        size = generate(src, params)
        log(f"generated bf16 checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - dt:.1f} s")
        t_conv, r = run([sys.executable, "-m", "provision.cli.main", "convert", str(src), "--out", str(fp8),
                         "--scheme", "fp8", "--layout", "hf", "--target", "h100", "--no-hf-tokenizer", "--no-compare",
                         "--json"],
                        "convert")
        if r.returncode != 0:
            print(f"provision convert failed ({r.returncode}):\n{r.stderr[-3000:]}", file=sys.stderr)
            return 1
        fp8_bytes = sum(p.stat().st_size for p in weight_files(fp8))
        figures["convert_fp8_seconds"] = round(t_conv, 2)
        log(f"converted to fp8/hf: {fp8_bytes / 1e9:.2f} GB in {t_conv:.1f} s")
        t_warm = read_through(weight_files(src) + weight_files(fp8))
        log(f"page cache warmed: {(size + fp8_bytes) / 1e9:.2f} GB read in {t_warm:.1f} s")

        h2d = b.h2d_gbps((2 << 30) if device == "cuda" else (64 << 20))
        b.free()
        figures["h2d_gbps"] = round(h2d, 3)
        log(f"{'pinned host-to-device' if device == 'cuda' else 'host copy (dry run)'} bandwidth: {h2d:.2f} GB/s")
        peers = b.peers()
        figures["peers"] = sorted(peers) or None
        if not peers:
            log("no streaming loader from PyPI installed (pip install fastsafetensors to compare with one)")

        model = measure_loads(b, "bf16", src, size, peers, figures, log)
        figures["bf16"]["decode_ms_per_token"] = round(b.decode_ms(model, ns.tokens), 3)
        log(f"bf16: decode {figures['bf16']['decode_ms_per_token']:.2f} ms/token")
        del model
        b.free()

        model = measure_loads(b, "fp8", fp8, fp8_bytes, peers, figures, log)
        kernels = ["auto", "dequant"] + (["scaled_mm"] if ns.dry_run else [])  # the CPU's auto is dequant
        logits: dict[str, Any] = {}
        for k in kernels:
            set_fp8_kernel(model, k)  # type: ignore[arg-type]
            ms = b.decode_ms(model, ns.tokens)
            used = kernels_used(model)
            logits[k] = b.last_logits(model)
            figures["fp8"][f"decode_ms_per_token_{k}"] = round(ms, 3)
            figures["fp8"][f"kernels_{k}"] = used
            log(f"fp8 ({k}): decode {ms:.2f} ms/token, layers by kernel {used}")
        a, d = logits["auto"], logits["dequant"]
        cos = float(torch.nn.functional.cosine_similarity(a, d, dim=0))
        figures["fp8"]["auto_vs_dequant_logits"] = {"cosine": round(cos, 6),
                                                    "same_top1": bool(a.argmax() == d.argmax())}
        log(f"fp8 auto vs dequant last-token logits: cosine {cos:.6f}, same top-1 {bool(a.argmax() == d.argmax())}")
        del model, logits, a, d
        b.free()

        t_smoke, r = run([sys.executable, "-m", "provision.cli.main", "smoke", str(fp8), "--device", device,
                          "--json"], "smoke")
        rep: dict[str, Any] = {}
        if r.stdout.strip():
            try:
                rep = json.loads(r.stdout).get("smoke") or {}
            except (ValueError, AttributeError):
                rep = {}
        figures["smoke_fp8"] = {"seconds": round(t_smoke, 3), "exit_code": r.returncode,
                                "load_seconds": rep.get("load_seconds"),
                                "per_token_seconds": rep.get("per_token_seconds")}
        log(f"provision smoke (fp8 profile, {device}): {t_smoke:.2f} s wall, exit {r.returncode}, load "
            f"{rep.get('load_seconds')} s, {rep.get('per_token_seconds')} s/token")
        if r.returncode != 0:
            log(r.stderr[-2000:])

        checks: list[tuple[str, bool]] = []
        for label in ("bf16", "fp8"):
            f = figures[label]
            ours, ref = f["ours_load_model"], f["load_file"]
            if "gbps" not in ours or "gbps" not in ref:
                checks.append((f"{label} load ran", False))
                continue
            log(f"{label}: ours {ours['gbps']:.2f} GB/s = {ours['gbps'] / h2d:.0%} of the "
                f"{'pinned host-to-device' if device == 'cuda' else 'host copy'} bandwidth, "
                f"{ours['gbps'] / ref['gbps']:.2f}x load_file, "
                f"{ours['gbps'] / f['previous_loader']['gbps']:.2f}x the previous loader"
                + "".join(f", {ours['gbps'] / f[p]['gbps']:.2f}x {p}" for p in peers if "gbps" in f[p]))
            f["fraction_of_h2d"] = round(ours["gbps"] / h2d, 3)
            f["vs_load_file"] = round(ours["gbps"] / ref["gbps"], 3)
            checks.append((f"{label} load >= {LOAD_GBPS_TARGET:g} GB/s", ours["gbps"] >= LOAD_GBPS_TARGET))
            checks.append((f"{label} load >= {LOAD_VS_LOAD_FILE_TARGET:g}x load_file",
                           f["vs_load_file"] >= LOAD_VS_LOAD_FILE_TARGET))
        checks.append(("fp8 decode faster than bf16",
                       figures["fp8"]["decode_ms_per_token_auto"] < figures["bf16"]["decode_ms_per_token"]))
        checks.append((f"fp8 smoke passes in <= {SMOKE_SECONDS_TARGET:g} s",
                       r.returncode == 0 and t_smoke <= SMOKE_SECONDS_TARGET))
        figures["checks"] = {name: ok for name, ok in checks}
        for name, ok in checks:
            log(f"{name}: {'PASS' if ok else 'FAIL'}{' (not gated: dry run)' if ns.dry_run else ''}")
        if ns.report is not None:
            ns.report.write_text(json.dumps(figures, indent=2) + "\n")
        if ns.dry_run:
            log("dry run on the CPU with a tiny checkpoint: every step ran; no target is gated")
            return 0
        return 0 if all(ok for _, ok in checks) else 1
    finally:
        if not ns.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
