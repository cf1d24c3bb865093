"""Work that overlaps the caller's by one step: one background thread, one job in flight."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor


class OneInFlight:
    """Runs jobs on one background thread, one at a time: `submit` first waits for the job before it (raising its
    error there), so the caller works on the next item meanwhile and memory holds one job's inputs, not a queue.

    Threads help where the work releases the GIL (torch operations, hashlib, file writes). As a context manager it
    waits for the last job when its block succeeds, and on any exit stops the thread.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None

    def submit(self, job, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(job, *args)

    def wait(self) -> None:
        """Until the job in flight is done (its error, if any, raised here)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        """Stop the thread, after the job in flight (its error, if any, dropped: the caller is already failing)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> OneInFlight:
        return self

    def __exit__(self, *error) -> None:
        try:
            if error[0] is None:
                self.wait()
        finally:
            self.close()
