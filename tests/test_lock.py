"""The lock file (issue 15, item 6): requirements/lock-cpu.txt lists exactly the versions
installed in the venv this suite runs in, so it cannot go stale silently; the conda
environments are on current channels and pin the same versions."""
from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock-cpu.txt"
KEY = ("torch", "fairscale", "snakemake", "snakemake-executor-plugin-slurm",
       "snakemake-executor-plugin-slurm-jobstep", "pandas", "pyarrow")


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    return pins


@pytest.mark.parametrize("name", KEY)
def test_lock_pins_the_installed_version(name: str) -> None:
    # metadata.version reads the installed distribution, not the lock tool's output
    assert _lock()[name] == metadata.version(name), f"rewrite it: python requirements/lock.py > {LOCK}"


def test_lock_is_the_whole_installed_closure() -> None:
    """Every package llmenergy[test] needs is pinned at its installed version, nothing else."""
    proc = subprocess.run([sys.executable, str(REPO / "requirements" / "lock.py"), "--check", str(LOCK)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    # the closure reaches the transitive dependencies, beyond pyproject's direct ones
    assert {"torch", "fairscale", "sympy", "snakemake-interface-executor-plugins",
            "pytest", "seaborn"} <= set(_lock())
    assert all(re.fullmatch(r"[a-z0-9-]+", n) for n in _lock())


def test_lock_check_reports_a_stale_pin(tmp_path: Path) -> None:
    stale = tmp_path / "lock.txt"
    stale.write_text(LOCK.read_text().replace(f"pandas=={metadata.version('pandas')}", "pandas==2.0.0"))
    proc = subprocess.run([sys.executable, str(REPO / "requirements" / "lock.py"), "--check", str(stale)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert f"pandas=={metadata.version('pandas')}" in proc.stderr and "pandas==2.0.0" in proc.stderr


def _conda_pins(path: Path) -> tuple[dict, dict[str, str]]:
    env = yaml.safe_load(path.read_text())
    pins: dict[str, str] = {}
    for dep in env["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)=?=([^=\s]+)(?:=\S+)?", item)
            if m:
                pins[m.group(1)] = m.group(2)
    return env, pins


@pytest.mark.parametrize("name", ["llmenergy.yaml", "analysis.yaml"])
def test_conda_envs_are_on_current_channels_and_match_the_lock(name: str) -> None:
    env, pins = _conda_pins(REPO / "envs" / name)
    assert env["channels"] == ["conda-forge", "nodefaults"]  # not the deprecated `pytorch` channel
    lock = _lock()
    conda_names = {"pytorch": "torch"}
    for pkg, version in pins.items():
        locked = lock.get(conda_names.get(pkg, pkg))
        if locked is not None:
            assert version == locked.split("+")[0], (name, pkg, version, locked)
    assert {"pandas", "pyarrow"} <= set(pins)
    if name == "llmenergy.yaml":
        assert pins["pytorch"] == lock["torch"].split("+")[0] and pins["fairscale"] == lock["fairscale"]
        assert "pytorch=2.13.0=cuda*" in env["dependencies"]  # the CUDA build, not the CPU one
        assert any(str(d).startswith("cuda-version=") for d in env["dependencies"])


def test_every_rule_env_exists() -> None:
    """The conda: directives of the rules name files that are here."""
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for rel in re.findall(r'"(\.\./\.\./envs/[^"]+)"', smk.read_text()):
            assert (smk.parent / rel).resolve().is_file(), (smk.name, rel)
