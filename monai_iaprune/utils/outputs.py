"""A run's output files as one transaction: a lock per output folder, checks first, temporary names, one commit.

``OutputTransaction`` is what a prune run (bundle or overlay) wraps its writing in. On entry, before any work, it
checks that every output folder can be written (a probe file is created and removed), takes an exclusive lock file
``.monai_iaprune.lock`` (pid, host, start time) in each folder, removes the temporary files a killed run left
(``.NAME.*.tmp``, the pattern of ``atomic_write`` and of this module) and refuses when any output already exists,
unless ``overwrite``. The run writes to ``temp(path)`` names; ``commit()`` renames them into place in the order they
were registered (register the report last). On an error every temporary file is removed; the locks are always
released.

The renames of a commit are journaled: before the first one a journal ``.monai_iaprune.commit.<token>.json``
(every ``[temporary, final]`` pair) is written and synced in the first output's folder, and it is removed after the
last. A run killed between the renames leaves its journal; the next transaction on that folder (holding its lock)
rolls the commit forward before anything else, so the outputs of one run are either all in place or none is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

from monai_iaprune.utils.settings import as_bool

__all__ = [
    "LOCK_NAME",
    "OutputLockedError",
    "OutputTransaction",
    "acquire_lock",
    "check_folder_writable",
    "clean_stale_temps",
    "complete_interrupted_commits",
    "file_mode_for",
    "release_lock",
]

LOCK_NAME = ".monai_iaprune.lock"
JOURNAL_PREFIX = ".monai_iaprune.commit."
logger = logging.getLogger(__name__)


class OutputLockedError(RuntimeError):
    """Another live run holds the lock of an output folder."""


def check_folder_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (with parents) and a probe file in it, then remove the probe; raise naming the folder.

    Raises:
        PermissionError: the folder cannot be created or written (also a path below a regular file).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".monai_iaprune.probe.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"output folder {str(folder)!r} is not writable ({type(e).__name__}: {e}); "
            "fix its permissions or point the output setting elsewhere"
        ) from e
    return folder


def file_mode_for(path: str | os.PathLike) -> int:
    """Permission bits a file written at ``path`` should get: those of the file it replaces, else what ``open``
    gives a new file (``0o666`` less the process umask). Temporary files are created ``0o600``; without this every
    output renamed from one would be readable by its owner only."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        return 0o666 & ~umask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def acquire_lock(folder: str | os.PathLike) -> Path:
    """Take the exclusive lock file ``folder/.monai_iaprune.lock`` (``O_CREAT | O_EXCL``) holding pid, host, start.

    A lock of a process that no longer runs on this host is taken over with a warning.

    Returns:
        The lock file's path (give it to ``release_lock``).

    Raises:
        OutputLockedError: another run (alive, or on another host) holds the lock; the message names its pid, host
            and the lock path.
    """
    path = Path(folder) / LOCK_NAME
    info = {"pid": os.getpid(), "host": socket.gethostname(), "start": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                held = {}
            pid, host = held.get("pid"), held.get("host")
            if isinstance(pid, int) and host == info["host"] and not _pid_alive(pid):
                logger.warning(f"taking over the stale lock {path} of process {pid}, which no longer runs")
                path.unlink(missing_ok=True)
                continue
            started = held.get("start")
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
            raise OutputLockedError(
                f"another prune run (pid {pid} on host {host}, started {since}) holds the lock {path}: wait for it "
                "to finish, or choose other output folders; if that process is gone, remove the lock file"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        return path
    raise OutputLockedError(f"could not take the lock {path}: it keeps reappearing")


def release_lock(path: str | os.PathLike) -> None:
    """Remove a lock file this process holds (one of another process is left alone)."""
    path = Path(path)
    try:
        held = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return
    if held.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files / folders ``.NAME.*.tmp`` a killed run left in ``folder`` (hold its lock first)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.name.count(".") >= 3:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        logger.warning(f"removed {len(removed)} temporary file(s) of an interrupted run in {folder}")
    return removed


def _move_into_place(tmp: Path, path: Path) -> None:
    if tmp.is_dir():
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.rename(tmp, path)
    else:
        os.replace(tmp, path)


def complete_interrupted_commits(folder: str | os.PathLike) -> list[Path]:
    """Finish the commits a killed run left half done in ``folder`` (its journals); return the outputs put in place.

    A journal is written in full and synced before the first rename, so a readable one means every output of that
    run was written: the temporary files still present are renamed into place. An unreadable journal (the run was
    killed while writing it, before any rename) is removed and its temporary files are left to
    ``clean_stale_temps``. Hold the folder's lock first.
    """
    done: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return done
    for journal in sorted(folder.glob(JOURNAL_PREFIX + "*.json")):
        try:
            pairs = json.loads(journal.read_text())["renames"]
            pairs = [(Path(t), Path(p)) for t, p in pairs]
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning(f"removing the unreadable commit journal {journal} (its run never renamed a file)")
            journal.unlink(missing_ok=True)
            continue
        for tmp, path in pairs:
            if tmp.exists() or tmp.is_symlink():
                _move_into_place(tmp, path)
                done.append(path)
        journal.unlink(missing_ok=True)
        logger.warning(
            f"completed the commit of an interrupted run from {journal.name}: "
            f"{[str(p) for p in done] or 'every output was already in place'}"
        )
    return done


class OutputTransaction:
    """Write a run's outputs (files or folders) under temporary names and put them in place together at the end.

    Args:
        outputs: every output the run may write (files or folders), in commit order; the report last.
        overwrite: replace existing outputs; otherwise entering refuses when any exists (``as_bool``).
        folders: more folders to check, lock and clean (the outputs' parent folders always are).
        lock: take the folders' lock files.

    Note:
        Use it as a context manager, call ``temp(path)`` for each output and ``commit()`` when all are written.
        Leaving the block without ``commit()`` (an error) removes the temporary files; outputs already in place
        are never touched then. Under ``torch.distributed`` only the writing rank (rank 0) should use it.
    """

    def __init__(
        self,
        outputs: Sequence[str | os.PathLike],
        overwrite: bool = False,
        folders: Iterable[str | os.PathLike] = (),
        lock: bool = True,
    ) -> None:
        self.outputs = [Path(p) for p in outputs]
        self.overwrite = as_bool(overwrite, "overwrite")
        self.folders = list(dict.fromkeys([p.parent for p in self.outputs] + [Path(f) for f in folders]))
        self.lock = lock
        self.token = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._locks: list[Path] = []
        self._temps: dict[Path, Path] = {}
        self._scratch: list[Path] = []
        self._created: list[
            tuple[Path, Path]
        ] = []  # (folder, its top-most ancestor this transaction created)
        self._committed = False

    def begin(self) -> OutputTransaction:
        """Check writability, lock, clean stale temporary files, refuse existing outputs (unless ``overwrite``)."""
        for folder in self.folders:
            top = next((a for a in reversed([folder, *folder.parents]) if not a.exists()), None)
            check_folder_writable(folder)
            if top is not None:
                self._created.append((folder, top))
        try:
            if self.lock:
                for folder in self.folders:
                    self._locks.append(acquire_lock(folder))
            for folder in self.folders:
                complete_interrupted_commits(folder)
            for folder in self.folders:
                clean_stale_temps(folder)
            existing = [str(p) for p in self.outputs if p.exists()]
            if existing and not self.overwrite:
                raise FileExistsError(
                    f"refusing to overwrite {existing}; move them away or pass --overwrite true"
                )
        except BaseException:
            self.release()
            raise
        return self

    def temp(self, path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Path:
        """The temporary name to write output ``path`` under: ``tmp``, default ``.NAME.<pid>.<random>.tmp`` beside it.

        A given ``tmp`` must lie in the same file system (e.g. in a ``scratch`` folder beside ``path``).
        """
        path = Path(path)
        if path not in self.outputs:
            raise ValueError(
                f"{path} is not one of this transaction's outputs {[str(p) for p in self.outputs]}"
            )
        tmp = Path(tmp) if tmp is not None else path.parent / f".{path.name}.{self.token}.tmp"
        self._temps[path] = tmp
        return tmp

    def scratch(self, folder: str | os.PathLike, name: str = "scratch") -> Path:
        """A new temporary folder ``.NAME.<pid>.<random>.tmp`` in ``folder``, removed when the transaction ends."""
        path = Path(folder) / f".{name}.{self.token}.tmp"
        path.mkdir(parents=True)
        self._scratch.append(path)
        return path

    def commit(self) -> list[Path]:
        """Rename every written temporary file into place, in ``outputs`` order; return the outputs put in place."""
        done = []
        pairs = [(self._temps[p], p) for p in self.outputs if p in self._temps and self._temps[p].exists()]
        journal = self._write_journal(pairs) if len(pairs) > 1 else None
        for tmp, path in pairs:
            _move_into_place(tmp, path)
            done.append(path)
        if journal is not None:
            journal.unlink(missing_ok=True)
        self._temps = {}
        self._committed = True
        self.abort()  # the scratch folders
        return done

    def _write_journal(self, pairs: list[tuple[Path, Path]]) -> Path:
        """Write and sync the list of renames before the first one (``complete_interrupted_commits`` reads it)."""
        journal = pairs[0][1].parent / f"{JOURNAL_PREFIX}{self.token}.json"
        data = json.dumps(
            {"pid": os.getpid(), "renames": [[str(t.absolute()), str(p.absolute())] for t, p in pairs]}
        )
        fd = os.open(journal, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return journal

    def abort(self) -> None:
        """Remove every temporary file / folder of this transaction."""
        for tmp in self._temps.values():
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink(missing_ok=True)
        self._temps = {}
        for path in self._scratch:
            shutil.rmtree(path, ignore_errors=True)
        self._scratch = []

    def release(self) -> None:
        """Release the lock files; without a commit, remove the (empty) folders this transaction created."""
        for path in self._locks:
            release_lock(path)
        self._locks = []
        if not self._committed:
            for folder, top in self._created:
                for d in [folder, *folder.parents]:
                    try:
                        d.rmdir()  # only empty folders
                    except OSError:
                        break
                    if d == top:
                        break
        self._created = []

    def __enter__(self) -> OutputTransaction:
        return self.begin()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.abort()
        finally:
            self.release()
