"""Admission control for an ensemble: requests in flight through one model version's pipeline, bounded.

Why: Triton 2.51 can bound a queue only where its batcher does not stall (``export/repository.py``, above
``MAX_QUEUE_SIZE``): at the ensemble's entrance, the text step. That step is fast, so under overload requests
pass it and wait in the unbounded queues of the slow steps behind it (VAN), and latency grows with the number
of clients. This bounds what matters instead: requests admitted by the entrance and not yet answered by the
ensemble's last step.

How: one small file per (repository, counter, model version, tritonserver process), in ``/dev/shm``: a float64
array whose slot 0 holds the expiry in seconds and every other non-zero slot the ``time.monotonic()`` (system-
wide on Linux, so comparable between the stub processes) at which one request was admitted. Steps open it by
name and change it under ``flock``:

- the entrance (the text step) :meth:`InFlight.admit` s each valid request; when ``limit`` requests are in
  flight it answers UNAVAILABLE "overloaded: ... in flight" at once (the client backs off and retries; a fleet
  client tries another replica without ejecting this one);
- the last step (the top-k step) :meth:`InFlight.release` s one slot for every request it answers, ok or not;
  a step that can refuse a request the entrance let in (VAN: NaN regions) releases one for each refusal;
- a request that fails anywhere else midway (a dead stub, a cancelled call) leaves its slot behind: slots older
  than the expiry no longer count, so a leak costs one slot for ``expiry_s`` at most.

Release is FIFO (the oldest live slot): slots are counts, not tickets, since nothing names a request across the
steps of an ensemble. Only the count matters for admission, so which slot goes is immaterial, except that a
leaked slot (the oldest) is the first a release clears.

Counters (``counter_path``): ``raw`` for ``amc`` and ``amc_v<N>`` (text step ``amc_tokenizer`` -> ... ->
``amc_topk``). Whole-store search counts nothing: ``amc_search`` is one step (``amc_search_step``), bounded by
Triton's limit on its queue.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SLOTS = 4096  # most requests one counter can hold in flight (the limit must be below)
PREFIX = "amc-admission-"


def folder() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def counter_path(repository: str | Path, counter: str, version: int | str, server_pid: int | None = None) -> Path:
    """The counter file of ``counter`` ("raw") for version ``version`` of the repository at
    ``repository`` (the folder holding the model folders), in the tritonserver process ``server_pid`` (default:
    this stub's parent, which is tritonserver)."""
    pid = os.getppid() if server_pid is None else server_pid
    key = hashlib.sha1(f"{Path(repository).resolve()}|{counter}|{version}".encode()).hexdigest()[:16]
    return folder() / f"{PREFIX}{pid}-{key}"


def remove_stale() -> None:
    """Remove the counter files of tritonserver processes that no longer run."""
    for path in folder().glob(f"{PREFIX}*-*"):
        try:
            pid = int(path.name.removeprefix(PREFIX).split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                path.unlink()
        except (ValueError, PermissionError, OSError):
            continue


class InFlight:
    """One counter file. ``limit`` (the entrance only): most requests in flight, 0 for no limit; ``expiry_s``
    (the entrance writes it into the file, releasing steps read it from there)."""

    def __init__(self, path: str | Path, *, limit: int = 0, expiry_s: float = 0.0) -> None:
        if limit >= SLOTS:
            raise ValueError(f"limit {limit} must be below {SLOTS}")
        self.path = Path(path)
        self.limit = limit
        self.expiry_s = expiry_s
        self._fd: int | None = None

    @contextlib.contextmanager
    def _locked(self):
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            data = os.pread(self._fd, SLOTS * 8, 0)
            slots = np.zeros(SLOTS, dtype=np.float64)
            slots[: len(data) // 8] = np.frombuffer(data[: len(data) // 8 * 8], dtype=np.float64)
            before = slots.copy()
            if self.expiry_s > 0:
                slots[0] = self.expiry_s
            yield slots
            if not np.array_equal(before, slots) or len(data) != SLOTS * 8:
                os.pwrite(self._fd, slots.tobytes(), 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    @staticmethod
    def _live(slots: np.ndarray, now: float) -> np.ndarray:
        """Mask of the request slots (1..) that count: admitted less than the expiry ago (default 30 s)."""
        expiry = slots[0] if slots[0] > 0 else 30.0
        times = slots[1:]
        return (times > 0) & (times > now - expiry)

    def admit(self, n: int = 1) -> tuple[int, int]:
        """Take up to ``n`` slots; returns (how many were taken, how many were in flight before)."""
        now = time.monotonic()
        with self._locked() as slots:
            live = self._live(slots, now)
            slots[1:][~live] = 0.0  # expired: forget
            count = int(live.sum())
            take = n if self.limit <= 0 else max(0, min(n, self.limit - count))
            free = np.flatnonzero(~live)[:take]
            slots[1 + free] = now
            return len(free), count

    def release(self, n: int = 1) -> None:
        """Give back ``n`` slots (the oldest live ones)."""
        if n <= 0:
            return
        now = time.monotonic()
        with self._locked() as slots:
            live = self._live(slots, now)
            slots[1:][~live] = 0.0
            live_at = np.flatnonzero(live)
            oldest = live_at[np.argsort(slots[1 + live_at], kind="stable")[:n]]
            slots[1 + oldest] = 0.0

    def in_flight(self) -> int:
        with self._locked() as slots:
            return int(self._live(slots, time.monotonic()).sum())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
