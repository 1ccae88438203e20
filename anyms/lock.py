"""One writer per output folder: the lock of ``anyms generate`` (``--jobs``, and one image's ``--out``).

A run holds ``DIR/.anyms.lock`` for as long as it writes in ``DIR``. The file names the holder
(its PID, host and launch); the lock itself is an advisory ``flock`` on it, which the system
releases when the holder's process ends however it ends, so a lock left by a killed run is free
and the next run takes it over. A second run while the first one holds it refuses at once,
naming the holder. The file is opened with ``O_NOFOLLOW``: a link planted under its name is
never followed (the run refuses, naming it).

The processes of one distributed launch (``accelerate launch``, ``torchrun``: the same
``MASTER_ADDR:MASTER_PORT``) are one writer: the first of them takes the lock exclusively,
writes the launch's name in it and keeps a shared lock, which the others of the same launch
join; a process of any other run finds the lock held and refuses.

While the lock is exclusive (taken by this run, before any of its processes writes), the run's
``prepare`` callback runs: ``--jobs`` removes there the temporary files a stopped run left.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from typing import Callable, Optional

__all__ = ["LOCK_NAME", "FolderBusy", "FolderLock", "launch_name"]

LOCK_NAME = ".anyms.lock"
# How long a process waits for another process of its own launch to finish writing the lock
# file, or to let go of the exclusive lock before it can join (both take milliseconds).
JOIN_SECONDS = 30.0


class FolderBusy(Exception):
    """The folder is another run's (or its lock cannot be used): one line, naming the holder."""


def launch_name(world: int) -> str:
    """What names this run in the lock: the launch (its rendezvous address) for the processes of a
    distributed launch, else this process alone."""
    if world > 1:
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if addr and port:
            run_id = os.environ.get("TORCHELASTIC_RUN_ID")
            return f"launch {addr}:{port}" + (f" ({run_id})" if run_id and run_id != "none" else "")
    return f"process {os.getpid()} on {socket.gethostname()}"


class FolderLock:
    """``with FolderLock(folder, launch, prepare=...):`` holds ``folder`` for this run (see the module)."""

    def __init__(self, folder: str, launch: str, prepare: Optional[Callable[[], None]] = None,
                 shared: bool = False, option: str = "--out-dir"):
        self.folder = folder
        self.option = option            # what the refusal tells the user to change
        self.path = os.path.join(folder, LOCK_NAME)
        self.launch = launch
        self.prepare = prepare
        self.shared = shared            # several processes of one launch hold it together
        self.fd: Optional[int] = None
        self.taken_over: Optional[dict] = None     # the record of a stopped run whose lock this took

    # ------------------------------------------------------------------ taking it
    def acquire(self) -> "FolderLock":
        deadline = time.monotonic() + JOIN_SECONDS
        while True:
            fd = self._open()
            try:
                if self._try(fd, fcntl.LOCK_EX):
                    if not self._still_the_file(fd):
                        continue                        # removed by its last holder meanwhile: again
                    self.fd, fd = fd, None
                    try:
                        self._own()
                    except BaseException:
                        self.release()
                        raise
                    return self
                holder = self._read(fd)
                if self.shared and holder.get("launch") == self.launch and self._try(fd, fcntl.LOCK_SH):
                    if self._still_the_file(fd) and self._read(fd).get("launch") == self.launch:
                        self.fd, fd = fd, None          # joined the other processes of this launch
                        return self
                    continue
                if holder.get("launch") == self.launch or not holder:
                    # another process of this launch is writing the file, or letting go of the
                    # exclusive lock: a moment
                    if time.monotonic() < deadline:
                        time.sleep(0.02)
                        continue
                raise FolderBusy(self._busy(holder))
            finally:
                if fd is not None:
                    os.close(fd)

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP or os.path.islink(self.path):
                raise FolderBusy(f"{self.path!r} is a link, not a lock this command made: it is not followed; "
                                 f"remove it if no run uses the folder") from None
            raise FolderBusy(f"cannot open the folder's lock {self.path!r} ({e.strerror or e})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FolderBusy(f"{self.path!r} is not a file, so it cannot be the folder's lock: remove it if no "
                             f"run uses the folder")
        return fd

    def _try(self, fd: int, mode: int) -> bool:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as e:            # a file system without locks (ENOLCK)
            raise FolderBusy(f"cannot lock {self.path!r} ({e.strerror or e}): one writer per folder needs a "
                             f"file system with file locks") from None
        return True

    def _still_the_file(self, fd: int) -> bool:
        """Whether ``fd`` is still the file named by the lock's path (a holder removes it on leaving)."""
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            data = os.pread(fd, 4096, 0)
            record = json.loads(data.decode("utf-8"))
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _own(self) -> None:
        """The lock is ours alone: note a stopped run's lock, write ours, prepare, then share it."""
        fd = self.fd
        before = self._read(fd)
        if before and before.get("launch") != self.launch:
            self.taken_over = before
        record = {"pid": os.getpid(), "host": socket.gethostname(), "launch": self.launch}
        data = (json.dumps(record) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        if self.prepare is not None:
            self.prepare()
        if self.shared:
            # Converting is not atomic: a run slipping in between finds this launch in the file and
            # refuses, or takes the lock and writes its own name, which makes this one refuse.
            if not self._try(fd, fcntl.LOCK_SH) or self._read(fd).get("launch") != self.launch:
                raise FolderBusy(self._busy(self._read(fd)))

    def _busy(self, holder: dict) -> str:
        if not holder:
            return (f"the output folder {self.folder!r} is in use by another run (its lock {LOCK_NAME} is held); "
                    f"one run writes in a folder at a time")
        who = f"PID {holder.get('pid')} on {holder.get('host')}"
        launch = holder.get("launch", "")
        if launch.startswith("launch "):
            who += f", {launch}"
        return (f"the output folder {self.folder!r} is in use by another run ({who}, in {LOCK_NAME}); one run "
                f"writes in a folder at a time: wait for it, or give another {self.option}"
                + (" folder" if self.option == "--out" else ""))

    # ----------------------------------------------------------------- letting go
    def release(self, wait: float = 0.0) -> None:
        """Let go; the last holder removes the file (waiting up to ``wait`` s for the others of its launch)."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            deadline = time.monotonic() + wait
            while True:
                if self._try(fd, fcntl.LOCK_EX):
                    if self._still_the_file(fd):
                        os.unlink(self.path)
                    break
                if time.monotonic() >= deadline:
                    break                   # another process still holds it: it is theirs to remove
                time.sleep(0.02)
        finally:
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
