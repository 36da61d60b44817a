"""The wheel built from pyproject.toml is complete: installed into a fresh virtual environment, away from the
repository, it finds its shipped manifests and plans Pixtral 12B offline, and it carries every command's report
schema (``provision schema COMMAND`` prints each)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_plans_pixtral_from_its_shipped_manifest(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(ROOT)], check=True, timeout=300)
    (wheel,) = dist.glob("provision-*.whl")
    shipped_schemas = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".schema.json")}
    in_repo = {p.name for p in (ROOT / "provision" / "data").glob("*.schema.json")}
    assert in_repo and shipped_schemas == in_repo

    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)
    # The dependencies (torch, libtorrent...) come from this test's environment, appended after the fresh
    # venv's own site-packages; its .pth files (the editable install of the repository) are not processed.
    fresh_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    (fresh_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROVISION_MANIFESTS")}
    where = subprocess.run([str(py), "-c", "import provision; print(provision.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(env_dir), where

    out = subprocess.run([str(env_dir / "bin" / "provision"), "plan", "pixtral-12b-2409", "--offline", "--json"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True
    assert report["plan"]["kind"] == "manifest"
    assert report["plan"]["name"] == "pixtral-12b-2409"
    shipped = (ROOT / "manifests" / "pixtral-12b-2409.toml").read_bytes()
    assert report["manifest_sha256"] == hashlib.sha256(shipped).hexdigest()
    assert {f["path"] for f in report["plan"]["files"]} >= {"consolidated.safetensors", "params.json", "tekken.json"}

    for cmd in ("ls", "manifest show", "doctor", "provision"):
        out = subprocess.run([str(env_dir / "bin" / "provision"), "schema", *cmd.split()], cwd=work, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        schema = json.loads(out.stdout)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", cmd
