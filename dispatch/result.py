"""A job's final result: its state, exit status, host and zipped working directory."""

from __future__ import annotations

from pathlib import Path

from dispatch.errors import JobRejectedError
from dispatch.extraction import Extracted, ExtractLimits, safe_extract
from dispatch.job import JobState, JobUpdate


class JobResult:
    """The final reply of a job, with ``extract`` to unpack its working directory safely."""

    def __init__(self, update: JobUpdate) -> None:
        if not update.is_final:
            raise ValueError(f"job {update.job_id}: {update.state.value} is not a final state")
        self.update = update

    def __repr__(self) -> str:
        return (f"<JobResult {self.job_id} {self.state.value} exit={self.exit_code} "
                f"signal={self.exit_signal} host={self.host}>")

    @property
    def job_id(self) -> str:
        """Return the job's id."""
        return self.update.job_id

    @property
    def state(self) -> JobState:
        """Return the final state: Exited, Rejected or Removed."""
        return self.update.state

    @property
    def exit_code(self) -> int | None:
        """Return the exit code, or None when the job was killed by a signal or never ran."""
        return self.update.exit_code

    @property
    def exit_signal(self) -> int | None:
        """Return the signal that killed the job, if one did."""
        return self.update.exit_signal if self.update.exit_by_signal else None

    @property
    def duration_s(self) -> float | None:
        """Return the job's wall-clock run time in seconds."""
        return self.update.duration_s

    @property
    def host(self) -> str | None:
        """Return the execute node that ran (or rejected) the job."""
        return self.update.host

    @property
    def reason(self) -> str | None:
        """Return why the job was rejected or removed."""
        return self.update.reason

    @property
    def archive(self) -> bytes:
        """Return the zip of the job's working directory (empty when it never ran)."""
        return self.update.archive

    @property
    def ok(self) -> bool:
        """Tell whether the job ran and exited with status 0."""
        return self.state is JobState.EXITED and self.exit_code == 0

    @property
    def shell_status(self) -> int:
        """Return the exit status a shell would report: the code, or 128 + signal."""
        return self.update.shell_status

    def extract(self, dest: Path | str, limits: ExtractLimits | None = None) -> Extracted:
        """Unpack the working directory into ``dest``, refusing traversal, links and bombs."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        if not self.archive:
            return Extracted((), ())
        return safe_extract(self.archive, dest, limits or ExtractLimits())

    def raise_for_rejection(self) -> None:
        """Raise JobRejectedError when the job was rejected."""
        if self.state is JobState.REJECTED:
            raise JobRejectedError(self.job_id, self.reason or "no reason given")
