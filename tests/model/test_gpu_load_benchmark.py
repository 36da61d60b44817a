"""benchmarks/gpu_load.py stays correct without a GPU: ``--dry-run`` runs every step on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_load.py"


@pytest.mark.slow
def test_the_dry_run_runs_every_measurement_on_the_cpu_and_gates_nothing(tmp_path: Path) -> None:
    from provision.testing.tiny import TINY_PARAMS

    report = tmp_path / "report.json"
    work = tmp_path / "work"
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--dir", str(work), "--tokens", "3",
                        "--report", str(report)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "no target is gated" in r.stdout
    fig = json.loads(report.read_text())
    assert fig["dry_run"] is True and fig["device"] == "cpu" and fig["h2d_gbps"] > 0
    linears = TINY_PARAMS["n_layers"] * 7  # wq wk wv wo w1 w2 w3 in each decoder layer are quantized
    for label in ("bf16", "fp8"):
        f = fig[label]
        for loader in ("load_file", "previous_loader", "ours_read_tensors", "ours_load_model"):
            assert f[loader]["seconds"] > 0 and f[loader]["gbps"] > 0, (label, loader)
        assert f["fraction_of_h2d"] > 0 and f["vs_load_file"] > 0
    assert fig["bf16"]["decode_ms_per_token"] > 0
    fp8 = fig["fp8"]
    assert fp8["kernels_auto"] == {"dequant": linears}  # the CPU's automatic choice
    assert fp8["kernels_scaled_mm"] == {"scaled_mm": linears}  # forced: the GPU's kernel call ran too
    assert fp8["auto_vs_dequant_logits"]["same_top1"] and fp8["auto_vs_dequant_logits"]["cosine"] > 0.999
    assert fig["smoke_fp8"]["exit_code"] == 0 and fig["smoke_fp8"]["load_seconds"] is not None
    assert set(fig["checks"]) == {"bf16 load >= 10 GB/s", "bf16 load >= 2x load_file", "fp8 load >= 10 GB/s",
                                  "fp8 load >= 2x load_file", "fp8 decode faster than bf16",
                                  "fp8 smoke passes in <= 10 s"}
    assert list(work.iterdir()) == []  # the generated checkpoints are gone


def test_without_a_gpu_it_says_so_and_exits_2() -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2
    assert "CUDA GPU" in r.stderr and "--dry-run" in r.stderr
