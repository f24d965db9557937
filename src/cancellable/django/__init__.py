"""A "Cancel selected tasks" action for django-celery-results' admin.

Add the app after the admin and django-celery-results (``pip install
'cancellable[django]'``)::

    INSTALLED_APPS = [
        ...,
        "django.contrib.admin",
        "django_celery_results",
        "cancellable.django",
    ]
    CANCELLABLE_CELERY_APP = "proj.celery.app"   # where your Celery app is

and run ``manage.py migrate`` (it creates the permission).  The changelist
of *Task results* then offers *Cancel selected tasks* to users who hold the
permission `PERMISSION` (superusers hold every permission); other staff do
not see the action.  It calls `cancellable.celery.cancel` with the user's
name as ``requested_by``, waits briefly on the receipt and reports each
task's outcome in the admin's message; finished tasks are left alone.  See
:doc:`/operating`.
"""

from __future__ import annotations

from typing import Final

__all__ = ["PERMISSION"]

#: The permission the action requires, ``app_label.codename`` as for
#: ``user.has_perm()``: assign it to a user or group in the admin.
PERMISSION: Final = "django_celery_results.cancel_taskresult"
