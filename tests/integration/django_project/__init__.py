"""A small real Django project for tests/integration/test_django_admin.py.

Its PostgreSQL database is named by ``CIT_DJANGO_DB`` (the test creates and
drops it); Celery's broker, queue and control exchange come from the same
``CIT_*`` variables as the other integration workers.
"""
