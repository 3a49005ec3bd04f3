"""Every error Dispatch raises, split by whose fault it is.

::

    DispatchError
    ├── BrokerError                 infrastructure; retrying may help
    │   ├── BrokerUnreachableError
    │   ├── UnroutableError         no queue is bound for the pool
    │   ├── PublishNackedError
    │   └── LedgerError            the ledger's database failed
    ├── InvalidJobError             the sender's fault; reject, never retry
    │   ├── InvalidMessageError     a job message that breaks the protocol
    │   ├── InvalidJobFileError     a job file that breaks jobfile.schema.json
    │   ├── InvalidRequirementsError
    │   └── UnsatisfiableJobError   valid, but can never run on this node
    ├── JobOutcomeError             the job's own outcome
    │   ├── JobRejectedError
    │   └── JobTimeoutError         the caller stopped waiting
    ├── ArchiveError                an archive unsafe or too big to unpack
    └── ResultNotSavedError         a final result the CLI cannot save (it stays queued)

Third-party exceptions are translated into this tree at the broker edge
(:mod:`dispatch.broker`) and nowhere else.
"""

from __future__ import annotations


class DispatchError(Exception):
    """Raised for every failure Dispatch reports; the root of the tree."""


class BrokerError(DispatchError):
    """Raised when the broker or the network fails; retrying may help."""


class BrokerUnreachableError(BrokerError):
    """Raised when no connection to the broker can be made."""


class UnroutableError(BrokerError):
    """Raised when the broker returns a job because no queue is bound for its pool."""


class PublishNackedError(BrokerError):
    """Raised when the broker refuses responsibility for a published message."""


class LedgerError(BrokerError):
    """Raised when the ledger's database cannot be opened, read or written."""


class NodeNameInUseError(DispatchError):
    """Raised when another execute node connected to the broker already has this name."""


class InvalidJobError(DispatchError):
    """Raised when a job is invalid: the sender's fault, never worth a retry.

    ``field`` names the header, property or job-file field at fault, when one is.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    @property
    def reason(self) -> str:
        """The one-line reason sent in a ``Rejected`` reply or printed by the CLI."""
        text = str(self)
        if self.field and not text.startswith(self.field):
            return f"{self.field}: {text}"
        return text


class InvalidMessageError(InvalidJobError):
    """Raised when a job message breaks the wire protocol (headers, properties, body)."""


class InvalidJobFileError(InvalidJobError):
    """Raised when a YAML or JSON job file breaks ``schemas/jobfile.schema.json``."""


class InvalidRequirementsError(InvalidJobError):
    """Raised when a ``Requirements`` expression cannot be parsed or evaluated."""


class UnsatisfiableJobError(InvalidJobError):
    """Raised when a valid job asks for more than this execute node can ever give."""


class JobOutcomeError(DispatchError):
    """Raised for the outcome of the job itself rather than of Dispatch."""


class JobRejectedError(JobOutcomeError):
    """Raised when a worker answered the job with ``JobState`` ``Rejected``."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} rejected: {reason}")
        self.job_id = job_id
        self.reason = reason


class JobTimeoutError(JobOutcomeError):
    """Raised when the caller's wait ends before the job's final reply arrives."""


class ArchiveError(DispatchError):
    """Raised when an archive is not a zip, or unpacking it would be unsafe."""


class ResultNotSavedError(DispatchError):
    """Raised when a final result cannot be saved; its reply stays queued for the next reader."""
