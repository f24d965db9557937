"""A minimal Django settings module: django-celery-results on a test's own database.

The database is named by the environment when this module is imported:
``CANCELLABLE_TEST_DJANGO_DB`` (a PostgreSQL database on the server of
`tests.sql_dbs`, made by the test).  Used by the django-db tests of the
SQL ledger, in the test process and in its workers
(``DJANGO_SETTINGS_MODULE=tests.django_settings``).
"""

from __future__ import annotations

import os

from sqlalchemy.engine import make_url
from tests import sql_dbs

_server = make_url(sql_dbs.POSTGRES)

SECRET_KEY = "cancellable-tests-only"
USE_TZ = True
INSTALLED_APPS = ["django_celery_results"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("CANCELLABLE_TEST_DJANGO_DB", "cancellable_test_django"),
        "USER": _server.username or "postgres",
        "PASSWORD": _server.password or "",
        "HOST": _server.host or "127.0.0.1",
        "PORT": str(_server.port or 5432),
        "OPTIONS": {"connect_timeout": 5},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
