"""The output folder of a training run: one run at a time, a finished run never replaced by accident, the final
model written atomically, the run's log kept in the folder, and a fingerprint of what the run is.

    OUTPUT_DIR/
      .lock        the pid of the process training into the folder, while it trains
      run.json     the run's fingerprint (recipe + data + starting model + engine)
      train.log    the run's log (appended to by every run into the folder)
      recipe.yaml  the resolved recipe (overrides applied)
      model/       the final model, replaced in one rename

`RunFolder` is the context manager a training job runs in; `write_folder_atomically` and `write_file_atomically`
write what must never be seen half-written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RUN_FILE = "run.json"
LOG_FILE = "train.log"
# Records that go to the run's train.log only (Trainer's log entries, which its progress bar already shows).
TRAIN_LOG_ONLY = "rnn_seq2seq_hf.train_log"


class RunFolderError(ValueError):
    """The output folder cannot be used for this run; the one-line message says why and what to do."""


class DiskFullError(OSError):
    """Writing stopped because the disk is full; what was there before is unchanged."""


# --- files that appear whole or not at all -------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _is_disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error) or "StorageFull" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def write_file_atomically(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary sibling, fsync and rename: readers see the old or the new file."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_path(path.parent)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if _is_disk_full(error):
            raise DiskFullError(
                errno.ENOSPC, f"No space left on device while writing {path}; it is unchanged"
            ) from None
        raise
    return path


def _recover_interrupted_swap(folder: Path) -> None:
    """A crash between the two renames of `write_folder_atomically` leaves the previous folder under its old-name;
    put it back."""
    for old in folder.parent.glob(f".old-{folder.name}-*"):
        if not folder.exists():
            os.replace(old, folder)
            logger.warning("restored %s from an interrupted replacement", folder)
        else:
            shutil.rmtree(old, ignore_errors=True)


def write_folder_atomically(folder: str | Path, write: Callable[[Path], object]) -> Path:
    """Create `folder` with `write(temporary_folder)`, then make it appear in one step.

    `write` fills a temporary sibling folder; its files and the folder are flushed to disk, and only then is it
    renamed to `folder`. A previous `folder` stays intact until that rename (it is moved aside and deleted after).
    Any error leaves the previous folder as it was and removes the temporary one; a full disk is a `DiskFullError`
    whose message says "No space left on device".
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_swap(folder)
    temporary = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        write(temporary)
        for path in sorted(temporary.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            fsync_path(path)
        fsync_path(temporary)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if _is_disk_full(error):
            raise DiskFullError(
                errno.ENOSPC,
                f"No space left on device while writing {folder}; the previous {folder.name}/ is unchanged",
            ) from None
        raise
    previous = folder.parent / f".old-{folder.name}-{os.getpid()}"
    if folder.exists():
        os.replace(folder, previous)
    os.replace(temporary, folder)
    fsync_path(folder.parent)
    shutil.rmtree(previous, ignore_errors=True)
    return folder


# --- one run at a time ---------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on an output folder: the file `.lock` holding the owner's pid and host, locked with
    `flock` while the owner runs.

    The kernel drops the `flock` when its process dies, so a lock file left by a killed run is stale: the next run
    takes it over (and says so). A live owner makes `acquire` raise `RunFolderError` naming its pid.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.descriptor: int | None = None

    def _owner(self) -> str:
        with contextlib.suppress(OSError):
            return self.path.read_text().split("\n")[0].strip()
        return "unknown"

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                raise RunFolderError(
                    f"{self.folder} is in use by another training run (pid {self._owner()}); wait for it to end or "
                    "choose another --output-dir"
                ) from None
            # The previous owner may have removed the file between our open and our lock: lock the file that is there.
            try:
                same = os.stat(self.path).st_ino == os.fstat(descriptor).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(descriptor)
                continue
            previous = os.read(descriptor, 256).decode(errors="replace").split("\n")[0].strip()
            if previous.isdigit() and int(previous) != os.getpid():
                state = "still running, but not training here" if _pid_alive(int(previous)) else "no longer running"
                logger.warning("%s: taking over a stale lock of pid %s (%s)", self.folder, previous, state)
            os.ftruncate(descriptor, 0)
            os.lseek(descriptor, 0, os.SEEK_SET)
            os.write(descriptor, f"{os.getpid()}\n{socket.gethostname()}\n".encode())
            os.fsync(descriptor)
            self.descriptor = descriptor
            return

    def release(self) -> None:
        if self.descriptor is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.descriptor).st_ino:
                os.unlink(self.path)
        os.close(self.descriptor)  # drops the flock
        self.descriptor = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --- what the run is -----------------------------------------------------------------------------------------------


def texts_digest(texts: Iterable[str]) -> str:
    """sha256 of a sequence of texts (each followed by a NUL, so ["ab"] and ["a", "b"] differ)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def run_fingerprint(recipe: dict, data: dict[str, Iterable[str]], **extra) -> str:
    """A short hash of what a run trains: the recipe's settings (not its name, description or file), the data of
    every split, and `extra` (engine, starting model). Two runs with the same fingerprint train the same model."""
    settings = {key: value for key, value in recipe.items() if key not in ("source", "name", "description")}
    record = {
        "recipe": settings,
        "data": {split: texts_digest(texts) for split, texts in sorted(data.items())},
        **extra,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:32]


def is_finished_run(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "model").is_dir() and (folder / "metrics.json").is_file()


def is_main_process() -> bool:
    """Rank 0 of a launched run (torchrun / accelerate launch set RANK), or a plain process. Read from the
    environment, so nothing distributed is initialised before the training engine does it."""
    return int(os.environ.get("RANK", "0")) == 0


class RunFolder:
    """The context a training run works in (see the module docstring).

    On entry: refuse a finished run unless `overwrite` (which then removes the previous run's checkpoints and
    metrics; its model/ stays until the new one replaces it), take the lock (main process only), refuse
    checkpoints that another run wrote (`run.json` holds their fingerprint), record this run's fingerprint and
    copy the log into `train.log`. On exit, also after an error: stop logging to the file and release the lock.

    Args:
        checkpoints: the folder the engine writes its checkpoints into (inside `folder`).
    """

    def __init__(
        self, folder: str | Path, fingerprint: str, overwrite: bool = False, checkpoints: str = "checkpoints"
    ):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.overwrite = overwrite
        self.checkpoints = self.folder / checkpoints
        self.main = is_main_process()
        self.lock = RunLock(self.folder)
        self._log_handler: logging.Handler | None = None
        self._console: logging.Handler | None = None

    def _check_checkpoints_belong_to_this_run(self) -> None:
        if not self.checkpoints.is_dir() or not any(self.checkpoints.glob("checkpoint-*")):
            return
        recorded = None
        with contextlib.suppress(OSError, ValueError):
            recorded = json.loads((self.folder / RUN_FILE).read_text()).get("fingerprint")
        if recorded != self.fingerprint:
            why = "the recipe, data or starting model changed" if recorded else "no record of the run that wrote them"
            raise RunFolderError(
                f"{self.checkpoints} holds checkpoints of another run ({why}); pass --overwrite-output-dir to start "
                "over, or choose another --output-dir"
            )

    def __enter__(self) -> RunFolder:
        if is_finished_run(self.folder) and not self.overwrite:
            raise RunFolderError(
                f"{self.folder} holds a finished run (model/ and metrics.json); pass --overwrite-output-dir to "
                "replace it, or choose another --output-dir"
            )
        if not self.overwrite:
            self._check_checkpoints_belong_to_this_run()
        if not self.main:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            if self.overwrite:
                shutil.rmtree(self.checkpoints, ignore_errors=True)
                for name in ("metrics.json", RUN_FILE):
                    (self.folder / name).unlink(missing_ok=True)
            write_file_atomically(self.folder / RUN_FILE, json.dumps({"fingerprint": self.fingerprint}) + "\n")
            self._start_log()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stop_log()
        if self.main:
            self.lock.release()

    def _start_log(self) -> None:
        """Copy the run's log into train.log: the library's INFO lines (whatever the console shows), transformers'
        warnings, and Trainer's log entries (`TRAIN_LOG_ONLY`). What the console shows does not change."""
        handler = logging.FileHandler(self.folder / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        library = logging.getLogger("rnn_seq2seq_hf")
        # The library's records reach the file at INFO and the console's handlers only at the level they did before.
        self._saved = (library.level, library.propagate, library.getEffectiveLevel())
        library.setLevel(min(logging.INFO, self._saved[2]))
        library.propagate = False
        self._console = _ForwardAbove(self._saved[2]) if self._saved[1] else None
        for target in (library, logging.getLogger("transformers"), logging.getLogger(TRAIN_LOG_ONLY)):
            target.addHandler(handler)
        if self._console is not None:
            library.addHandler(self._console)
        only_file = logging.getLogger(TRAIN_LOG_ONLY)
        only_file.propagate = False
        only_file.setLevel(logging.INFO)
        self._log_handler = handler

    def _stop_log(self) -> None:
        if self._log_handler is None:
            return
        library = logging.getLogger("rnn_seq2seq_hf")
        for target in (library, logging.getLogger("transformers"), logging.getLogger(TRAIN_LOG_ONLY)):
            target.removeHandler(self._log_handler)
        if self._console is not None:
            library.removeHandler(self._console)
        library.setLevel(self._saved[0])
        library.propagate = self._saved[1]
        self._log_handler.close()
        self._log_handler = None


class _ForwardAbove(logging.Handler):
    """Hands records at or above `threshold` to the handlers of the library logger's ancestors (the console), as
    propagation did before the run lowered the library's level for train.log."""

    def __init__(self, threshold: int):
        super().__init__()
        self.threshold = threshold

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < self.threshold:
            return
        parent = logging.getLogger("rnn_seq2seq_hf").parent
        while parent is not None:
            for handler in parent.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
            parent = parent.parent if parent.propagate else None


__all__ = [
    "DiskFullError",
    "RunFolder",
    "RunFolderError",
    "RunLock",
    "TRAIN_LOG_ONLY",
    "fsync_path",
    "is_finished_run",
    "is_main_process",
    "run_fingerprint",
    "texts_digest",
    "write_file_atomically",
    "write_folder_atomically",
]
