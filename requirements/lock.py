"""Write the lock file of this environment: every package that llmenergy[test] needs, at
the version installed here, one ``name==version`` a line (``pip install -r`` reads it).

    python requirements/lock.py > requirements/lock-cpu.txt        # the CI venv (make venv)
    python requirements/lock.py > requirements/lock-site-cu128.txt # your cluster's venv

Only the dependency closure of ``llmenergy[test]`` is listed (not whatever else the
environment holds), with markers evaluated for this interpreter and platform, so a CUDA
torch brings its ``nvidia-*`` wheels. ``--check FILE`` exits 1 when FILE differs from
this environment (tests/test_lock.py runs it).
"""
from __future__ import annotations

import platform
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = "llmenergy"
EXTRAS = ("test",)
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def root_requirements(extras: tuple[str, ...] = EXTRAS) -> list[str]:
    """llmenergy's own requirements, from this checkout's pyproject.toml (an editable
    install's metadata goes stale when pyproject.toml changes)."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    return list(project["dependencies"]) + [r for e in extras
                                            for r in project["optional-dependencies"][e]]


def closure(extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """``{canonical name: installed version}`` of everything ``llmenergy[extras]`` needs."""
    found: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(ROOT, extras)]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (canonical(name), wanted) in seen:
            continue
        seen.add((canonical(name), wanted))
        if canonical(name) == ROOT:
            requires = root_requirements(wanted)
        else:
            dist = metadata.distribution(name)
            found[canonical(name)] = dist.version
            requires = dist.requires or []
        for line in requires:
            req = Requirement(line)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((req.name, tuple(sorted(req.extras))))
    return found


def lock_lines() -> list[str]:
    return [f"{name}=={version}" for name, version in sorted(closure().items())]


def header() -> list[str]:
    import torch

    cuda = torch.version.cuda or "none (CPU build)"
    return [f"# llmenergy[test] closure, written by requirements/lock.py on Python "
            f"{platform.python_version()} {sys.platform} {platform.machine()}; torch CUDA: {cuda}."]


def main(argv: list[str]) -> int:
    lines = lock_lines()
    if argv[:1] == ["--check"]:
        with open(argv[1], encoding="utf-8") as fh:
            have = [ln.strip() for ln in fh if ln.strip() and not ln.startswith(("#", "-"))]
        if have == lines:
            return 0
        missing, extra = sorted(set(lines) - set(have)), sorted(set(have) - set(lines))
        sys.stderr.write(f"{argv[1]} is stale: installed here but not in it: {missing or 'none'}; "
                         f"in it but not installed here: {extra or 'none'}. "
                         f"Rewrite it: python requirements/lock.py > {argv[1]}\n")
        return 1
    sys.stdout.write("\n".join(header() + lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
