"""Dispatch execute nodes: the AMQP consumer, the job runner."""
