"""The run folder of `ebt train`: one run at a time, checkpoints that are complete or absent, nothing lost.

- `RunLock`: an exclusive `flock` on the run folder itself, held for the life of the process (the kernel drops it
  when the process dies, even by SIGKILL, so a killed run never leaves the folder locked; nothing is written).
- One definition of a complete checkpoint (`is_complete_checkpoint`): a folder `checkpoint-N` whose
  `trainer_state.json` parses and says `global_step` N. A checkpoint is written into `tmp-checkpoint-N/` and only
  renamed to `checkpoint-N` once every process has written all of its files (`commit_checkpoint`); an old one is
  first renamed away (`tmp-deleting-…`) and then deleted, so no folder called `checkpoint-N` is ever partly written
  or partly deleted. Rotation (`rotate_checkpoints`) orders by step, never by modification time, and only deletes
  complete checkpoints older than the newest complete one.
- `commit_files` / `write_text_atomic`: the final model is written into `tmp-final/` and its files renamed into the
  run folder; `training_summary.json`, renamed into place last, marks a finished run.
- `fault_point`: named points where `EBT_FAULT_INJECTION` makes the process kill itself or pause (used by the
  fault-injection tests; inert without that variable).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock, the run folder is not locked
    fcntl = None

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
STAGING_PREFIX = "tmp-"  # tmp-checkpoint-N/, tmp-final/, tmp-deleting-checkpoint-N/: never a complete checkpoint
FINAL_STAGING = "tmp-final"


# --- fault injection (tests only) --------------------------------------------------------------------------------

_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """`EBT_FAULT_INJECTION="NAME=kill"` (or `NAME=kill@K`: the K-th time, or `NAME=sleep:S`) SIGKILLs or pauses
    the process when it reaches the point `name`."""
    spec = os.environ.get("EBT_FAULT_INJECTION")
    if not spec:
        return
    for rule in spec.split(","):
        point, _, action = rule.partition("=")
        action, _, nth = action.partition("@")
        if point != name:
            continue
        _fault_counts[name] = _fault_counts.get(name, 0) + 1
        if nth and _fault_counts[name] != int(nth):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("sleep:"):
            time.sleep(float(action.split(":", 1)[1]))


# --- one run per folder ------------------------------------------------------------------------------------------


class RunLock:
    """Holds an exclusive lock on `folder` (created if missing) or refuses at once if another process holds it.

    Only the first process of a launch takes it (`enabled`), so the processes of one `accelerate launch` run do not
    refuse each other. If the run fails while holding the lock in a folder it created, the empty folder goes."""

    def __init__(self, folder: str | os.PathLike, enabled: bool = True):
        self.folder, self.enabled, self.fd, self.created = Path(folder), enabled and fcntl is not None, None, False

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"output dir {self.folder} exists and is not a folder")
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise RuntimeError(f"output dir {self.folder} is in use by another `ebt train` run (it holds the folder's "
                               "lock); wait for that run to finish, or choose another --output-dir") from None
        fault_point("locked")
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.fd is None:
            return
        if exc_type is not None and self.created and not any(self.folder.iterdir()):
            self.folder.rmdir()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


# --- complete checkpoints ---------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: Path) -> bool:
    """The one definition: `checkpoint-N/` whose trainer_state.json (the Trainer writes it last) says step N."""
    step = checkpoint_step(path)
    if step is None or not path.is_dir():
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == step


def complete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in `folder`, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_complete_checkpoint(p)), key=checkpoint_step)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir` (None if there is none)."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def remove_folder(path: Path) -> None:
    """Renames `path` away first (one atomic step), then deletes it: a kill mid-way leaves a `tmp-deleting-…`
    folder, never a partly deleted folder under its old name."""
    doomed = path.with_name(f"{STAGING_PREFIX}deleting-{path.name}")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    fault_point("removing")
    shutil.rmtree(doomed)


def clear_leftovers(folder: str | os.PathLike) -> None:
    """Before a run writes anything: deletes what killed runs left (staging folders, incomplete `checkpoint-N`
    folders of older versions); complete checkpoints are kept."""
    folder = Path(folder)
    for path in sorted(folder.glob(f"{STAGING_PREFIX}*")):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in sorted(folder.glob("checkpoint-*")):
        if path.is_dir() and not is_complete_checkpoint(path):
            remove_folder(path)


def rotate_checkpoints(folder: str | os.PathLike, keep: int | None, protected: str | None = None) -> None:
    """Keeps the `keep` newest complete checkpoints (and `protected`, the best model's); deletes older complete ones.
    Incomplete folders are never counted (and never kept in place of a complete one: they do not exist under a
    checkpoint name)."""
    if not keep or keep <= 0:
        return
    found = complete_checkpoints(folder)
    protected = Path(protected).name if protected else None
    for path in found[:-keep]:
        if path.name != protected:
            remove_folder(path)


# --- atomic writes -----------------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """Flushes every file of `folder` and the folder itself to disk (so that a rename publishes written data)."""
    for path in folder.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(folder)


def commit_checkpoint(staged: Path, final: Path) -> None:
    """Publishes a fully written `staged` checkpoint as `final` in one rename (replacing an older `final`)."""
    sync_tree(staged)
    fault_point("checkpoint-staged")
    if final.exists():
        remove_folder(final)
    os.replace(staged, final)
    _fsync(final.parent)
    fault_point("checkpoint-committed")


def commit_files(staged: Path, folder: Path) -> None:
    """Moves every file of `staged` into `folder` (each by one rename, replacing the old file), then removes it."""
    sync_tree(staged)
    for path in sorted(staged.iterdir()):
        os.replace(path, folder / path.name)
        fault_point("final-file-committed")
    _fsync(folder)
    staged.rmdir()


def write_text_atomic(path: Path, text: str) -> None:
    """Writes `path` under a temporary name and renames it into place: readers see the old file or the new one."""
    temporary = path.with_name(f"{STAGING_PREFIX}{path.name}")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync(path.parent)


__all__ = [
    "RunLock",
    "clear_leftovers",
    "commit_checkpoint",
    "commit_files",
    "complete_checkpoints",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
    "rotate_checkpoints",
    "write_text_atomic",
]
