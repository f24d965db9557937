"""pytest plugin for ``scripts/celery_unit_suite.py``: import the Celery integration.

Loaded with ``-p cancellable_imported`` before Celery's tests are collected,
as an application that uses `cancellable` would import it.
"""

from __future__ import annotations

import cancellable.celery  # noqa: F401  (the import is the point)
