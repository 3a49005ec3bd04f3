"""The job ledger: every job and node, from lifecycle events, in one database.

- :mod:`~dispatch.ledger.store`: the :class:`Ledger` (SQLite by default, PostgreSQL by URL);
- :mod:`~dispatch.ledger.transitions`: how each event changes a job, idempotently;
- :mod:`~dispatch.ledger.service`: ``dispatch ledger``, the consumer loop;
- :mod:`~dispatch.ledger.leases`: expired leases -> the job goes out again, or on hold;
- :mod:`~dispatch.ledger.control`: rm/hold/release, authorized and broadcast;
- :mod:`~dispatch.ledger.explain`: why a job is not running;
- :mod:`~dispatch.ledger.notify`: e-mail and webhook notices.
"""

from dispatch.ledger.records import JobRecord, LedgerState, NodeRecord
from dispatch.ledger.store import Ledger

__all__ = ["JobRecord", "Ledger", "LedgerState", "NodeRecord"]
