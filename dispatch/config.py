"""Settings from the environment, one place, typed. Pure apart from reading a small id file."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from dispatch.topology import CLASSIC, DEFAULT_POOL, check_client_id, check_queue_type

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672//"

#: Environment variables Dispatch reads, with what they mean (the README's table).
VARIABLES = {
    "DISPATCH_BROKER_URL": "AMQP URL of the broker (default amqp://guest:guest@localhost:5672//); "
    "for a cluster, its nodes' URLs separated by ;",
    "DISPATCH_QUEUE_TYPE": "classic (default) or quorum: the type of the job, reply and ledger "
    "queues; the same everywhere on one broker",
    "DISPATCH_CLIENT_ID": "this client's id; names its reply queue dispatch.reply.<id>",
    "DISPATCH_POOL": f"pool jobs go to when none is given (default {DEFAULT_POOL})",
    "DISPATCH_RESULTS_DIR": "where results are unpacked (default ./dispatch-results)",
    "DISPATCH_CONFIG_DIR": "where the client id is kept (default ~/.config/dispatch)",
    "DISPATCH_LEDGER_URL": "ledger database URL (default sqlite:///<DISPATCH_DATA_DIR>/ledger.db)",
    "DISPATCH_DATA_DIR": "where the default SQLite ledger lives (default ~/.local/share/dispatch)",
    "DISPATCH_ADMINS": "comma-separated broker users who may rm/hold/release any job",
    "DISPATCH_POOLS": "the ledger's pools file: each pool's fallback pools by job kind",
    "DISPATCH_SMTP_URL": "SMTP server for job notices, smtp://[user:pass@]host:port",
    "DISPATCH_MAX_RESULT_BYTES": "largest result a worker sends as one reply; more goes in "
    "checked chunks (default 16 MiB)",
    "DISPATCH_SPOOL_DIR": "where a worker keeps results it could not deliver "
    "(default <workdir root>/.spool)",
}


def queue_type(environ: dict[str, str] | None = None) -> str:
    """Return ``DISPATCH_QUEUE_TYPE`` (classic when unset); raise ValueError if unusable."""
    env = os.environ if environ is None else environ
    return check_queue_type((env.get("DISPATCH_QUEUE_TYPE") or CLASSIC).strip().lower())


@dataclass(frozen=True)
class Settings:
    """Client-side settings; ``from_env`` reads them, arguments override."""

    broker_url: str = DEFAULT_BROKER_URL
    client_id: str | None = None
    pool: str = DEFAULT_POOL
    results_dir: Path = Path("dispatch-results")
    config_dir: Path = Path.home() / ".config" / "dispatch"
    broker_configured: bool = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Return settings from ``DISPATCH_*`` variables."""
        env = os.environ if environ is None else environ
        config_dir = env.get("DISPATCH_CONFIG_DIR")
        return cls(
            broker_url=env.get("DISPATCH_BROKER_URL") or DEFAULT_BROKER_URL,
            client_id=env.get("DISPATCH_CLIENT_ID") or None,
            pool=env.get("DISPATCH_POOL") or DEFAULT_POOL,
            results_dir=Path(env.get("DISPATCH_RESULTS_DIR") or "dispatch-results"),
            config_dir=Path(config_dir) if config_dir else Path.home() / ".config" / "dispatch",
            broker_configured=bool(env.get("DISPATCH_BROKER_URL")),
        )

    def stable_client_id(self) -> str:
        """Return this user's client id, creating and keeping one on first use.

        A stable id lets ``dispatch submit`` and a later ``dispatch listen`` or
        ``dispatch wait`` share one durable reply queue.
        """
        if self.client_id:
            return check_client_id(self.client_id)
        path = self.config_dir / "client-id"
        try:
            return check_client_id(path.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            pass
        client_id = f"{os.environ.get('USER') or 'user'}-{uuid.uuid4().hex[:12]}"
        client_id = "".join(c if c.isalnum() or c in "_.:-" else "-" for c in client_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(client_id + "\n", encoding="utf-8")
        return client_id
