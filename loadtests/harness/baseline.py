"""A baseline install: konvert as of an older commit, to measure side by side with the current one.

The commit is exported with ``git archive REF | tar -x`` into ``<cache>/<commit id>/`` and
installed there in a virtualenv of its own (``python -m venv`` with this interpreter, so both
installs run the same Python; ``pip install -e``, so its source digest reads as the current
checkout's would for the same code). A finished build is marked and reused by later runs; an
unfinished one (a build that failed or was stopped) is removed and built again. Builds of one
commit take turns under a lock file.
"""

from __future__ import annotations

import fcntl
import json
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
READY_FILE = ".konvert-baseline.json"
GIT_TIMEOUT_SECONDS = 120
INSTALL_TIMEOUT_SECONDS = 900


class BaselineError(Exception):
    """The baseline could not be had: an unknown ref, no git, or an install that failed."""


@dataclass(frozen=True)
class Baseline:
    commit: str
    directory: Path

    @property
    def python(self) -> str:
        return str(self.directory / ".venv" / "bin" / "python")


def resolve_commit(ref: str, repository: Path = REPOSITORY) -> str:
    """The full commit id a ref names in the repository."""
    try:
        found = subprocess.run(
            ["git", "-C", str(repository), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_SECONDS,
            check=False,
        )
    except OSError as exc:
        raise BaselineError(f"git is needed for --baseline-ref: {exc}") from exc
    if found.returncode != 0 or not found.stdout.strip():
        raise BaselineError(f"--baseline-ref {ref!r} names no commit in {repository} {found.stderr.strip()}")
    return found.stdout.strip()


def ready_marker(commit: str, python_version: str) -> dict[str, str]:
    """What a finished build records, and what a later run must find to reuse it."""
    return {"commit": commit, "python": python_version}


def is_ready(directory: Path, commit: str, python_version: str) -> bool:
    """Whether ``directory`` holds a finished build of ``commit`` for this Python version."""
    try:
        marker = json.loads((directory / READY_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker == ready_marker(commit, python_version) and (directory / ".venv" / "bin" / "python").exists()


def prepare(ref: str, cache: Path, say: Callable[[str], None], repository: Path = REPOSITORY) -> Baseline:
    """The baseline install of ``ref``: reused from ``cache`` when built before, built otherwise."""
    commit = resolve_commit(ref, repository)
    directory = cache.resolve() / commit
    python_version = platform.python_version()
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f"{commit}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run building the same commit finishes first
        if is_ready(directory, commit, python_version):
            say(f"baseline {commit[:12]}: reusing {directory}")
            return Baseline(commit, directory)
        if directory.exists():
            shutil.rmtree(directory)
        say(f"baseline {commit[:12]}: exporting it and installing it in {directory / '.venv'}")
        try:
            _export(repository, commit, directory)
            _install(directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        (directory / READY_FILE).write_text(json.dumps(ready_marker(commit, python_version)) + "\n")
    return Baseline(commit, directory)


def _export(repository: Path, commit: str, directory: Path) -> None:
    """``git -C <repository> archive <commit> | tar -x -C <directory>``."""
    directory.mkdir(parents=True)
    archive = subprocess.Popen(
        ["git", "-C", str(repository), "archive", "--format=tar", commit],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert archive.stdout is not None
    try:
        untar = subprocess.run(
            ["tar", "-x", "-C", str(directory)],
            stdin=archive.stdout,
            capture_output=True,
            timeout=GIT_TIMEOUT_SECONDS,
            check=False,
        )
    finally:
        archive.stdout.close()
        archive_err = archive.stderr.read().decode(errors="replace") if archive.stderr else ""
        archive.wait(timeout=GIT_TIMEOUT_SECONDS)
    if archive.returncode != 0 or untar.returncode != 0:
        raise BaselineError(f"exporting {commit} failed: {archive_err.strip()} {untar.stderr.decode(errors='replace')}")


def _install(directory: Path) -> None:
    """A virtualenv in ``directory/.venv`` (this interpreter's Python) with the export installed
    in it, editable, without the embedded servers (the harness gives it PostgreSQL and Redis)."""
    venv = directory / ".venv"
    steps = (
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-e", str(directory)],
        [str(venv / "bin" / "python"), "-c", "import konvert.cli"],
    )
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_SECONDS, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BaselineError(f"installing the baseline failed: {' '.join(step)}: {exc}") from exc
        if done.returncode != 0:
            # pip's warnings about unreadable index pages come first; the error is at the end.
            raise BaselineError(
                f"installing the baseline failed: {' '.join(step)} exited {done.returncode}:\n"
                f"{(done.stdout + done.stderr).strip()[-3000:]}"
            )
