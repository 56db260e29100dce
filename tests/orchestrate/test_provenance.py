"""provenance.git_commit against real temporary git repositories."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from llmenergy.orchestrate import provenance

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org", "-c", "init.defaultBranch=main",
           *args]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(root: Path, files: dict[str, str]) -> str:
    """A git repository at ``root`` with ``files`` committed; returns its commit."""
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    return git(root, "rev-parse", "HEAD")


PACKAGE = {"src/llmenergy/__init__.py": "__version__ = 'x'\n", "pyproject.toml": "[project]\nname='llmenergy'\n"}


def test_checkout_src_package_records_its_commit(tmp_path: Path) -> None:
    commit = make_repo(tmp_path / "llmenergy", PACKAGE)
    assert provenance.git_commit(tmp_path / "llmenergy" / "src" / "llmenergy") == commit


def test_a_checkout_whose_code_differs_from_its_commit_records_it_dirty(tmp_path: Path) -> None:
    """The commit alone would claim code that did not run: a changed or new file under src/
    (or workflow/, Snakefile) makes it ``<commit>-dirty``; an edited config or doc does not."""
    root = tmp_path / "llmenergy"
    commit = make_repo(root, {**PACKAGE, "config.yaml": "a: 1\n", "workflow/rules/run.smk": "rule x:\n"})
    package = root / "src" / "llmenergy"
    (root / "config.yaml").write_text("a: 2\n")
    (root / "notes.md").write_text("x\n")
    assert provenance.git_commit(package) == commit
    (package / "extra.py").write_text("X = 1\n")  # a new module, not yet added
    assert provenance.git_commit(package) == f"{commit}-dirty"
    (package / "extra.py").unlink()
    (root / "workflow" / "rules" / "run.smk").write_text("rule y:\n")
    assert provenance.git_commit(package) == f"{commit}-dirty"
    git(root, "commit", "-qam", "y")
    assert provenance.git_commit(package) == git(root, "rev-parse", "HEAD") != commit


def test_working_directory_in_another_repository_does_not_matter(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    commit = make_repo(tmp_path / "llmenergy", PACKAGE)
    other = make_repo(tmp_path / "analysis", {"notes.md": "x\n"})
    monkeypatch.chdir(tmp_path / "analysis")
    assert provenance.git_commit(tmp_path / "llmenergy" / "src" / "llmenergy") == commit != other


def test_copy_inside_another_repository_records_no_commit(tmp_path: Path) -> None:
    # the package copied (or vendored) into a project that is itself a git repository
    make_repo(tmp_path / "project", {"vendor/llmenergy/src/llmenergy/__init__.py": "", "README": "x\n"})
    assert provenance.git_commit(tmp_path / "project" / "vendor" / "llmenergy" / "src" / "llmenergy") is None


def test_package_installed_into_a_venv_inside_a_checkout_records_no_commit(tmp_path: Path) -> None:
    make_repo(tmp_path / "llmenergy", PACKAGE)
    installed = tmp_path / "llmenergy" / ".venv" / "lib" / "site-packages" / "llmenergy"
    installed.mkdir(parents=True)
    assert provenance.git_commit(installed) is None


def test_package_outside_any_repository_records_no_commit(tmp_path: Path) -> None:
    package = tmp_path / "plain" / "src" / "llmenergy"
    package.mkdir(parents=True)
    assert provenance.git_commit(package) is None


def test_this_checkout(tmp_path: Path) -> None:
    """The package under test, imported from this worktree's ``src/``, records this worktree's
    HEAD (``-dirty`` while its code has uncommitted changes, as during development)."""
    package = Path(provenance.llmenergy.__file__).resolve().parent
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=package, capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() / "src" / "llmenergy" != package:
        pytest.skip("llmenergy is not imported from a git checkout's src/ here")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True).stdout.strip()
    assert provenance.git_commit().removesuffix("-dirty") == head
