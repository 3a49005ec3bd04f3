"""Benchmarks of Dispatch against the same work done as a Celery task (``python -m bench``)."""
