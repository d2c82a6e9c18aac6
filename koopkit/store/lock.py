"""One writer per run: a second writer on the same run is refused, naming the holder.

Local stores lock the run's directory with ``flock``, which the kernel releases when the
holder dies (even by SIGKILL), so a crash never leaves a stale lock. A process forked while
it holds one (a DataLoader worker) closes its copy of the descriptor at once: the lock would
otherwise live on in the child after the writer died. Other stores (memory, fsspec URLs) are
locked within this process only.
"""

from __future__ import annotations

import os
import threading
import weakref

from ..errors import RunLockedError

_IN_PROCESS: set[tuple[str, str]] = set()
_IN_PROCESS_GUARD = threading.Lock()
_HELD: weakref.WeakSet = weakref.WeakSet()  # RunLocks holding a flock in this process
_FORK_GUARD = threading.Lock()  # held across a fork: no lock is half taken or half released


def _drop_inherited_locks() -> None:
    """In a forked child: close the descriptors the parent's locks hold (the parent keeps
    its own, so its locks stand)."""
    for lock in list(_HELD):
        os.close(lock._fd)
        lock._fd = None
    _HELD.clear()
    _FORK_GUARD.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_FORK_GUARD.acquire,
        after_in_parent=_FORK_GUARD.release,
        after_in_child=_drop_inherited_locks,
    )


class RunLock:
    """Exclusive, non-blocking lock on one run; ``release`` is idempotent."""

    def __init__(self, url: str, run_id: str, directory=None, describe_holder=lambda: ""):
        self._key = (os.fspath(url), run_id)
        self._fd = None
        if directory is not None:
            import fcntl

            directory.mkdir(parents=True, exist_ok=True)
            with _FORK_GUARD:  # a fork in between would copy a descriptor _HELD does not list
                fd = os.open(directory, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                else:
                    self._fd = fd
                    _HELD.add(self)
            if self._fd is None:
                raise RunLockedError(self._refusal(run_id, describe_holder()))
        else:
            with _IN_PROCESS_GUARD:
                if self._key in _IN_PROCESS:
                    raise RunLockedError(self._refusal(run_id, describe_holder()))
                _IN_PROCESS.add(self._key)

    @staticmethod
    def _refusal(run_id: str, holder: str) -> str:
        by = f" by {holder}" if holder else ""
        return f"Run {run_id!r} is already being written{by}; one writer per run."

    def release(self) -> None:
        if self._fd is not None:
            with _FORK_GUARD:
                os.close(self._fd)  # closing the descriptor drops the flock
                self._fd = None
                _HELD.discard(self)
        else:
            with _IN_PROCESS_GUARD:
                _IN_PROCESS.discard(self._key)
