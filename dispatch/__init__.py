"""Dispatch: low-latency job dispatch over AMQP (protocol, client, CLI)."""
