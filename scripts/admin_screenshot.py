"""Make docs/_static/admin_cancel.png: the Django admin action, in headless Chromium.

Runs the test project of tests/integration/test_django_admin.py for real: a
PostgreSQL database (created, then dropped), a prefork worker, Django's
development server; then logs in with Debian's ``chromium`` (driven by
Playwright), selects two running tasks and a finished one, runs "Cancel
selected tasks", and photographs the result.  Needs what that test needs,
plus ``pip install playwright`` (its bundled browsers are not used)::

    CANCELLABLE_TEST_REDIS=redis://127.0.0.1:6379 .venv/bin/python scripts/admin_screenshot.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.conftest import (  # noqa: E402
    HOSTNAME,
    REDIS_URL,
    Worker,
    wait_for,
    worker_env,
)
from tests.integration.test_django_admin import _admin_sql, _started  # noqa: E402

OUT = REPO / "docs" / "_static" / "admin_cancel.png"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    uid = uuid.uuid4().hex[:10]
    database = f"cit_django_shot_{uid}"
    queue = exchange = f"cit-shot-{uid}"
    env = worker_env(broker_url=REDIS_URL, queue=queue, control_exchange=exchange)
    env.update(
        CIT_DJANGO_DB=database,
        CIT_APP_NAME=f"cit-django-{uid}",
        CIT_DJANGO_DEBUG="1",
        DJANGO_SETTINGS_MODULE="tests.integration.django_project.settings",
    )
    os.environ.update(env)
    _admin_sql(f'CREATE DATABASE "{database}"')
    worker = server = None
    logs = Path(tempfile.mkdtemp(prefix="admin-shot-"))
    try:
        import django

        django.setup()
        from django.contrib.auth.models import User
        from django.core.management import call_command
        from tests.integration.django_project import celery_app

        call_command("migrate", verbosity=0)
        User.objects.create_superuser("alice", password="wonderland")
        name = f"shot-{uid}@{HOSTNAME}"
        worker = Worker(
            name=name, queue=queue, control_exchange=exchange, pool="prefork", concurrency=2,
            broker="redis", app=celery_app.app, env=env, log_path=logs / "worker.log",
            argv=[
                sys.executable, "-m", "celery", "-A", "tests.integration.django_project.celery_app",
                "worker", "-P", "prefork", "-c", "2", "-Q", queue, "-n", name,
                "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info",
            ],
        )  # fmt: skip
        worker.start()
        app = celery_app.app
        finished = [app.send_task("cit.django.add", args=(i, i)) for i in range(3)]
        for result in finished:
            result.get(timeout=30)
        running = [
            app.send_task("cit.django.export", args=(f"shot:{uid}:{i}", 600)) for i in range(2)
        ]
        wait_for(lambda: all(_started(r.id) for r in running), 30, message="exports to start")

        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "django", "runserver", f"127.0.0.1:{port}", "--noreload"],
            cwd=REPO, env=env, stdout=(logs / "server.log").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_for(up, 30, message="the development server")

        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 640})
            page.goto(f"{base}/admin/login/?next=/admin/django_celery_results/taskresult/")
            page.fill("#id_username", "alice")
            page.fill("#id_password", "wonderland")
            page.click("input[type=submit]")
            page.wait_for_selector("#result_list")
            for task_id in [r.id for r in running] + [finished[0].id]:
                row = page.locator("#result_list tr", has_text=task_id)
                row.locator("input.action-select").check()
            page.select_option("select[name=action]", "cancel_selected_tasks")
            page.click("button[name=index]")
            page.wait_for_selector("ul.messagelist")
            page.select_option("select[name=action]", "cancel_selected_tasks")
            time.sleep(0.3)
            page.screenshot(path=str(OUT), full_page=True)
            browser.close()
        print(f"wrote {OUT}")
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=20)
        if worker is not None:
            worker.stop()
        from django.db import connections

        connections.close_all()
        _admin_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


if __name__ == "__main__":
    sys.exit(main())
