"""Benchmark: `provision convert --scheme fp8 --layout hf` on a Pixtral-12B-shaped random checkpoint.

Generates a random bf16 checkpoint with Pixtral 12B's real params.json (585 tensors,
25,365,479,424 bytes of tensor data; ``--scale`` shrinks the layer count and vocabulary for
quick runs), then measures in the same run:

* ``cp`` of the same file on the same disk plus the fsync of the copy (page cache dropped for the
  file first), before each round of conversions and after the last (the fastest is the reference), and
* ``provision convert SRC --out OUT --scheme fp8 --layout hf --workers N`` under ``/usr/bin/time -v``
  for each N of ``--workers`` (default ``1,default``: the serial path, then the default count).

With ``--repeat R`` every measurement is taken R times, interleaved, and the fastest counts.
Targets, for the last run (exit 1 when missed): peak resident memory < 2 GiB, and conversion
throughput (source bytes per second) >= 0.9x cp+sync's. Everything it writes is deleted at the end.

    .venv/bin/python benchmarks/convert_memory.py --dir /tmp/convbench            # full size (~25 GB)
    .venv/bin/python benchmarks/convert_memory.py --dir /tmp/convbench --scale 0.1 --workers 1,2,default
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PARAMS = {
    "dim": 5120, "n_layers": 40, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
    "rope_theta": 1000000000.0, "norm_eps": 1e-05, "vocab_size": 131072,
    "vision_encoder": {"hidden_size": 1024, "num_channels": 3, "image_size": 1024, "patch_size": 16,
                       "rope_theta": 10000.0, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_token_id": 10},
}
RSS_LIMIT = 2 * 2**30
RATIO_TARGET = 0.9


def scaled_params(scale: float) -> dict[str, object]:
    p = json.loads(json.dumps(PARAMS))
    if scale < 1:
        p["n_layers"] = max(1, round(40 * scale))
        p["vocab_size"] = max(1024, int(131072 * scale) // 128 * 128)
        p["vision_encoder"]["num_hidden_layers"] = max(1, round(24 * scale))  # type: ignore[index]
    return p


def drop_cache(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def generate(src: Path, params: dict[str, object]) -> tuple[int, int]:
    """params.json, tekken.json and a random bf16 consolidated.safetensors; (tensor count, file size)."""
    import torch

    from provision.formats.params import ModelArgs, tensor_spec
    from provision.formats.safetensors_writer import ShardWriter, TensorEntry
    from provision.testing.tiny import release_tekken_bytes

    src.mkdir(parents=True, exist_ok=True)
    (src / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    (src / "tekken.json").write_bytes(release_tekken_bytes())
    spec = tensor_spec(ModelArgs.from_dict(params))
    entries = [TensorEntry(k, "BF16", tuple(s)) for k, s in spec.items()]
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(64 << 20, generator=g) * 0.02).to(torch.bfloat16)  # 128 MiB of random values
    raw = memoryview(pool.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
    w = ShardWriter(src / "consolidated.safetensors", entries, {"format": "pt"})
    step = 32 << 20
    k = 0
    for e in entries:
        left = e.nbytes
        while left:
            n = min(step, left)
            off = (k * 7919 * 4096) % (len(raw) - n) // 2 * 2 if len(raw) > n else 0
            w.write(e.name, raw[off:off + n])
            left -= n
            k += 1
    w.finish()
    w.commit()
    return len(entries), (src / "consolidated.safetensors").stat().st_size


def cpu_rates() -> str:
    """One core's rate (MB/s of bf16 source) for fp8 quantization of 2.5 MiB pieces and for sha256:
    the CPU work per source byte of a conversion, to compare with the disk's rate."""
    import hashlib

    import torch

    from provision.quant import quantize_fp8
    from provision.stages.convert.allocator import keep_freed_blocks

    keep_freed_blocks()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w = (torch.randn(256, 5120) * 0.02).to(torch.bfloat16)
        nbytes = w.numel() * 2
        raw = w.view(torch.uint8).numpy().tobytes()
        rates = []
        for fn in (lambda: quantize_fp8(w), lambda: hashlib.sha256(raw).digest()):
            fn()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 1.0:
                fn()
                n += 1
            rates.append(n * nbytes / (time.perf_counter() - t0) / 1e6)
    finally:
        torch.set_num_threads(threads)
    return f"one core: fp8 quantization {rates[0]:.0f} MB/s, sha256 {rates[1]:.0f} MB/s of source"


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])}... failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return dt, r.stderr


def cp_sync(src: Path, copy: Path) -> float:
    """Seconds for ``cp`` of ``src`` (page cache dropped first) plus the fsync of the copy."""
    drop_cache(src)
    t0 = time.monotonic()
    timed(["cp", str(src), str(copy)])
    fd = os.open(copy, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.monotonic() - t0
    copy.unlink()
    drop_cache(src)
    return dt


def convert_once(timebin: str, src: Path, out: Path, workers: int | None) -> tuple[float, int, str]:
    """One ``provision convert --scheme fp8 --layout hf`` under ``time -v``: seconds, peak RSS, CPU line."""
    shutil.rmtree(out, ignore_errors=True)
    drop_cache(src / "consolidated.safetensors")
    cmd = [timebin, "-v", sys.executable, "-m", "provision.cli.main", "convert", str(src), "--out", str(out),
           "--scheme", "fp8", "--layout", "hf", "--target", "h100", "--no-hf-tokenizer", "--no-compare", "--json"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if k != "PROVISION_CONVERT_WORKERS"}
    dt, err = timed(cmd, env)
    cpu = {k: re.search(rf"{k}: ([\d.]+)", err) for k in ("User time \\(seconds\\)", "System time \\(seconds\\)",
                                                           "Percent of CPU this job got")}
    cpu_line = ", ".join(f"{k.split(' ')[0].replace('Percent', 'cpu%')} {m_.group(1)}" for k, m_ in cpu.items() if m_)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    rss = int(m.group(1)) * 1024 if m else 1 << 62
    return dt, rss, cpu_line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="where the work folder goes (default: a temp dir)")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink layers and vocab (1.0 = full 25 GB)")
    ap.add_argument("--workers", default="1,default",
                    help="comma-separated --workers values to measure, 'default' for none given (the targets "
                         "apply to the last one; default: 1,default)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each run (and cp+sync) this many times, interleaved, and keep the fastest of each "
                         "(on a shared machine the fastest is the one least slowed by others)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ns = ap.parse_args()
    if ns.repeat < 1:
        ap.error("--repeat must be at least 1")
    runs: list[int | None] = [None if w.strip() == "default" else int(w) for w in ns.workers.split(",") if w.strip()]
    if not runs:
        ap.error("--workers lists no run")
    if ns.dir is not None:
        ns.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="provision-convert-bench-", dir=ns.dir))  # only this is removed
    src, copy, out = base / "src", base / "copy.safetensors", base / "out"
    timebin = shutil.which("time") or "/usr/bin/time"
    if not Path(timebin).exists():
        print("/usr/bin/time is missing: apt-get install -y time", file=sys.stderr)
        return 2
    try:
        params = scaled_params(ns.scale)
        from provision.formats.params import ModelArgs, parameter_count
        from provision.stages.convert.parallel import MAX_DEFAULT_WORKERS, usable_cpus

        need = parameter_count(ModelArgs.from_dict(params)) * 2
        free = shutil.disk_usage(base).free
        if free < need * 2.2:
            print(f"not enough disk: need about {need * 2.2 / 1e9:.1f} GB, {free / 1e9:.1f} GB free", file=sys.stderr)
            return 2
        t0 = time.monotonic()
        count, size = generate(src, params)
        print(f"generated {count} tensors, {size / 1e9:.2f} GB in {time.monotonic() - t0:.1f} s (scale {ns.scale}); "
              f"{usable_cpus()} usable CPUs (default workers {min(usable_cpus(), MAX_DEFAULT_WORKERS)}), "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(cpu_rates())
        weights = src / "consolidated.safetensors"
        t_cp: list[float] = []
        best: dict[int, tuple[str, float, int]] = {}  # run index -> (label, fastest seconds, highest peak RSS)
        for rep in range(ns.repeat):
            t_cp.append(cp_sync(weights, copy))
            print(f"[{rep + 1}/{ns.repeat}] cp+sync: {t_cp[-1]:.1f} s, {size / t_cp[-1] / 1e6:.0f} MB/s "
                  f"(load average {os.getloadavg()[0]:.2f})")
            for i, w in enumerate(runs):
                t_conv, rss, cpu_line = convert_once(timebin, src, out, w)
                rec = json.loads((out / "provision-convert.json").read_text())
                written = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
                label = "default" if w is None else str(w)
                print(f"[{rep + 1}/{ns.repeat}] convert fp8/hf --workers {label}: {t_conv:.1f} s, "
                      f"{size / t_conv / 1e6:.0f} MB/s of source, wrote {written / 1e9:.2f} GB, peak RSS "
                      f"{rss / 2**20:.0f} MiB ({cpu_line}), quantized {rec['quality']['quantized_tensors']} tensors "
                      f"(relative error mean {rec['quality']['relative_error_mean']:.4f}; load average "
                      f"{os.getloadavg()[0]:.2f})")
                old = best.get(i)
                best[i] = (label, min(t_conv, old[1]) if old else t_conv, max(rss, old[2]) if old else rss)
        t_cp.append(cp_sync(weights, copy))  # again after the conversions: the disk's speed drifts under load
        cp_s = min(t_cp)
        print(f"cp+sync at the end: {t_cp[-1]:.1f} s; fastest of {len(t_cp)}: {cp_s:.1f} s, "
              f"{size / cp_s / 1e6:.0f} MB/s")
        results = [best[i] for i in range(len(runs))]
        for label, t_conv, rss in results:
            print(f"--workers {label}: {cp_s / t_conv:.2f}x cp+sync, peak RSS {rss / 2**30:.2f} GiB")
        label, t_conv, rss = results[-1]
        ratio = cp_s / t_conv
        ok_rss = rss < RSS_LIMIT
        ok_rate = ratio >= RATIO_TARGET
        print(f"--workers {label}: peak RSS {rss / 2**30:.2f} GiB < 2 GiB: {'PASS' if ok_rss else 'FAIL'}")
        print(f"--workers {label}: throughput {ratio:.2f}x cp+sync >= {RATIO_TARGET}x: {'PASS' if ok_rate else 'FAIL'}")
        return 0 if ok_rss and ok_rate else 1
    finally:
        if not ns.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
