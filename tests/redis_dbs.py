"""The Redis the test suite uses, and which of its databases each part owns.

One setting: ``CANCELLABLE_TEST_REDIS`` (default ``redis://127.0.0.1:6379``),
the server without a database number.  The suite **empties** databases 12,
13 and 15 of it (and 5 to 9 in ``make test``) and writes to 10, 11 and 14:

====  ==========================================  ============================
 DB   used by                                     emptied
====  ==========================================  ============================
  5   the third part of the integration tests     once per session
      when ``make unit`` runs them in three
      parts side by side
 6-9  the unit tests of the Celery integration    before and after each test
      on the older Celery minors, one database
      each (``make celery-minors``: 5.3 on 9,
      5.4 on 8, 5.5 on 7, 5.6 on 6)
 10   the test that a busy session lock fails     no (one key, 60 s expiry)
      fast (``test_harness.py``)
 11   the demo test (``--broker redis://.../11``)  no (it only adds keys)
 12   unit tests of the Celery integration        before and after each test
 13   integration tests (real workers)            once per session
 14   benchmarks and their smoke tests            by the benchmarks, per round
 15   the second part of the integration tests    once per session
      when ``make unit`` runs them in parts
====  ==========================================  ============================

``make unit`` gives the second and third parts their databases through
``CANCELLABLE_TEST_INTEGRATION_DB``, and ``make celery-minors`` each minor's unit
tests theirs through ``CANCELLABLE_TEST_UNIT_DB``: internal switches of the
Makefile (each run then has its own session lock and data).  The soak test starts a
Redis server of its own on a private port.  This
module must not import `cancellable`: the integration harness imports it.
"""

from __future__ import annotations

import os

__all__ = ["BASE", "DEMO_DB", "INTEGRATION_DB", "UNIT_DB", "url"]

BASE = os.environ.get("CANCELLABLE_TEST_REDIS", "redis://127.0.0.1:6379").rstrip("/")
DEMO_DB = 11
UNIT_DB = int(os.environ.get("CANCELLABLE_TEST_UNIT_DB", "12"))
INTEGRATION_DB = int(os.environ.get("CANCELLABLE_TEST_INTEGRATION_DB", "13"))


def url(db: int) -> str:
    """The URL of database ``db`` of the tests' Redis."""
    return f"{BASE}/{db}"
