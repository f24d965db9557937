"""The Django admin action on a real project (issue 20, Done-when 4).

A Django project (tests/integration/django_project) on a PostgreSQL database
this module creates and drops, django-celery-results as the result backend,
and a real prefork worker of that project.  Through Django's test client:
staff without the permission see no "Cancel selected tasks" action and
cannot run it; a user with it cancels a running task (stopped at a
checkpoint, ``requested_by`` their name) and a finished one (left alone),
and the admin's message lists each task's outcome from the receipt.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    HOSTNAME,
    REDIS_URL,
    SESSION_ID,
    Keys,
    Worker,
    wait_for,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: The PostgreSQL server (trust authentication on loopback).
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


def _admin_sql(statement: str) -> None:
    import psycopg

    with psycopg.connect(dbname="postgres", autocommit=True, **PG) as conn:
        conn.execute(statement)


@pytest.fixture(name="project", scope="module")
def project_fixture(worker_logs: Path) -> Iterator[Any]:
    """The project set up in this process (migrated), and its worker running."""
    uid = uuid.uuid4().hex[:10]
    database = f"cit_django_{uid}"
    queue = f"cit-{SESSION_ID}-django-{uid}"
    exchange = f"cit-{SESSION_ID}-django-{uid}"
    env = worker_env(broker_url=REDIS_URL, queue=queue, control_exchange=exchange)
    env.update(
        CIT_DJANGO_DB=database,
        CIT_APP_NAME=f"cit-django-{uid}",
        DJANGO_SETTINGS_MODULE="tests.integration.django_project.settings",
    )
    saved = dict(os.environ)
    from django.conf import settings as django_settings

    if django_settings.configured:
        # Django reads its settings once per process: another module's set-up
        # would make this project's requests go to that module's database.
        pytest.fail(
            f"Django was set up before with {django_settings.SETTINGS_MODULE}; "
            "run test_django_admin.py in a pytest process of its own (Makefile halves)"
        )
    _admin_sql(f'CREATE DATABASE "{database}"')
    worker = None
    try:
        os.environ.update(env)
        from django.core.management import call_command
        from tests.integration.django_project import celery_app

        call_command("migrate", verbosity=0)
        name = f"cancellable-test-{uid}@{HOSTNAME}"
        worker = Worker(
            name=name,
            queue=queue,
            control_exchange=exchange,
            pool="prefork",
            concurrency=2,
            broker="redis",
            app=celery_app.app,
            env=env,
            log_path=worker_logs / f"{uid}-django.log",
            argv=[
                sys.executable, "-m", "celery", "-A", "tests.integration.django_project.celery_app",
                "worker", "-P", "prefork", "-c", "2", "-Q", queue, "-n", name,
                "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info",
            ],
        )  # fmt: skip
        worker.start()
        yield celery_app
    finally:
        if worker is not None:
            worker.stop()
        os.environ.clear()
        os.environ.update(saved)
        from django.db import connections

        connections.close_all()
        _admin_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _users() -> tuple[Any, Any]:
    """A staff user who may view and delete results, and one who may view and cancel."""
    from django.contrib.auth.models import Permission, User

    def perm(codename: str) -> Any:
        return Permission.objects.get(
            content_type__app_label="django_celery_results", codename=codename
        )

    viewer = User.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(perm("view_taskresult"), perm("delete_taskresult"))
    operator = User.objects.create_user("operator", is_staff=True)
    operator.user_permissions.add(perm("view_taskresult"), perm("cancel_taskresult"))
    return viewer, operator


def _recorded(app: Any) -> dict[str, Any]:
    """The app's ledger (SQL, in the project's database, with django-db results):
    the reason recorded for each task id it names."""
    from cancellable.celery._runtime import runtime

    entries, _cursor = runtime().ledgers.get(app).read(None)
    return {
        target_id: entry.reason
        for entry in entries
        for kind, target_id in entry.targets
        if kind == "task"
    }


def _started(task_id: str) -> bool:
    from django_celery_results.models import TaskResult

    return TaskResult.objects.filter(task_id=task_id, status="STARTED").exists()


def test_the_cancel_action_needs_the_permission_and_reports_each_outcome(project, keys: Keys):
    """Without the permission: no action shown, a forged POST cancels nothing.  With it:
    the running task is stopped at a checkpoint with the user as requested_by, the
    finished one is left alone (still SUCCESS, nothing recorded in the ledger),
    and the message lists both outcomes."""
    from django.test import Client
    from django.urls import reverse
    from django_celery_results.models import TaskResult

    app = project.app
    viewer, operator = _users()
    finished = app.send_task("cit.django.add", args=(2, 3))
    assert 5 == finished.get(timeout=30)
    running = app.send_task("cit.django.export", args=(keys.key("e"),))
    wait_for(lambda: keys.flag("e", "looping") and _started(running.id), 30, message="export")
    pks = [TaskResult.objects.get(task_id=t).pk for t in (running.id, finished.id)]
    url = reverse("admin:django_celery_results_taskresult_changelist")
    form = {"action": "cancel_selected_tasks", "_selected_action": pks, "index": "0"}

    client = Client()
    client.force_login(viewer)
    page = client.get(url)
    forged = client.post(url, form, follow=True)

    assert 200 == page.status_code
    assert b"Delete selected task results" in page.content  # the viewer's one action
    assert b"Cancel selected tasks" not in page.content
    assert b"cancel_selected_tasks" not in page.content
    assert b"No action selected" in forged.content
    assert _started(running.id)
    assert {} == _recorded(app)

    client.force_login(operator)
    page = client.get(url)
    done = client.post(url, form, follow=True)

    assert b"Cancel selected tasks" in page.content
    text = done.content.decode()
    assert "Cancellation requested by operator for 2 task(s): 1 cancelled, 1 already" in text
    assert f"<code>{running.id}</code>: stopped at a checkpoint after " in text
    assert "(REVOKED: revoked by operator: cancelled in the Django admin)" in text
    assert f"<code>{finished.id}</code>: finished (SUCCESS); nothing to cancel" in text
    row = TaskResult.objects.get(task_id=running.id)
    assert "REVOKED" == row.status
    assert "revoked by operator: cancelled in the Django admin" in str(
        app.AsyncResult(running.id).result
    )
    assert "1" == keys.flag("e", "cleaned")
    assert "SUCCESS" == TaskResult.objects.get(task_id=finished.id).status
    recorded = _recorded(app)
    assert [running.id] == list(recorded)
    assert ("operator", "cancelled in the Django admin") == (
        recorded[running.id].requested_by,
        recorded[running.id].message,
    )
