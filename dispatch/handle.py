"""A submitted job as the client sees it: its stream of replies and its result."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from dispatch.errors import JobTimeoutError
from dispatch.job import JobUpdate
from dispatch.result import JobResult


class UpdateSource(Protocol):
    """Where a handle takes its replies from (a :class:`dispatch.client.Client`)."""

    def next_update(self, job_ids: Iterable[str] | None = None,
                    timeout_s: float | None = None, *,
                    before_ack: Callable[[JobUpdate], None] | None = None
                    ) -> JobUpdate | None:
        """Take the next reply for one of ``job_ids``, or None after ``timeout_s``."""


class JobHandle:
    """A submitted job: follow its ``updates`` or ``wait`` for its result."""

    def __init__(self, client: UpdateSource, job_id: str) -> None:
        self.client = client
        self.job_id = job_id
        self.last: JobUpdate | None = None

    def __repr__(self) -> str:
        return f"<JobHandle {self.job_id}>"

    def updates(self, timeout_s: float | None = None, *,
                before_ack: Callable[[JobUpdate], None] | None = None) -> Iterator[JobUpdate]:
        """Yield this job's replies as they arrive, ending with the final one.

        ``before_ack(update)`` runs before each reply is acked (to save a result
        first); if it raises, the reply stays queued. Raises JobTimeoutError when
        ``timeout_s`` passes before the final reply.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.last is None or not self.last.is_final:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            update = self.client.next_update([self.job_id], left, before_ack=before_ack)
            if update is None:
                raise JobTimeoutError(f"job {self.job_id}: no final reply within {timeout_s}s")
            self.last = update
            yield update

    def wait(self, timeout_s: float | None = None) -> JobResult:
        """Return the job's result once its final reply arrives."""
        last = self.last
        for update in self.updates(timeout_s):
            last = update
        if last is None:  # pragma: no cover - updates() ends only on a final reply
            raise JobTimeoutError(f"job {self.job_id}: no reply")
        return JobResult(last)
