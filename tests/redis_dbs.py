"""The Redis the test suite uses, and which of its databases each part owns.

One setting: ``CANCELLABLE_TEST_REDIS`` (default ``redis://127.0.0.1:6379``),
the server without a database number.  The suite **empties** databases 12,
13 and 15 of it (and 9 in ``make test``) and writes to 10, 11 and 14:

====  ==========================================  ============================
 DB   used by                                     emptied
====  ==========================================  ============================
  9   the unit tests of the Celery integration    before and after each test
      on the older Celery minors (``make
      celery-minors``, beside ``make unit``)
 10   the test that a busy session lock fails     no (one key, 60 s expiry)
      fast (``test_harness.py``)
 11   the demo test (``--broker redis://.../11``)  no (it only adds keys)
 12   unit tests of the Celery integration        before and after each test
 13   integration tests (real workers)            once per session
 14   benchmarks and their smoke tests            by the benchmarks, per round
 15   the second half of the integration tests,   once per session
      when ``make unit`` runs the two halves
      side by side
====  ==========================================  ============================

``make unit`` gives the second half its database through
``CANCELLABLE_TEST_INTEGRATION_DB=15``, and ``make celery-minors`` its unit
tests theirs through ``CANCELLABLE_TEST_UNIT_DB=9``: internal switches of the
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
