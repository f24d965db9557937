"""Integration tests: real Celery workers (subprocesses) against real brokers."""
