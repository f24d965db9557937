"""(j) Faults and edge cases: failing hooks, tasks without checkpoints, odd ids,
finished tasks, a broker that is down, and bad arguments to `cancel`."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from kombu.exceptions import OperationalError

from .conftest import (
    REDIS_URL,
    Keys,
    assert_revoked,
    client_app,
    ledger_keys,
    task_meta,
    wait_for,
)
from .settings import make_app

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def test_failing_hook_does_not_stop_other_hooks(shared_worker, keys: Keys):
    """(j) A hook that raises: the other hooks still run (last-registered-first), task REVOKED."""
    worker = shared_worker()
    result = worker.send("cit.loop_raising_hook", keys.key("t"), 20.0)
    wait_for(lambda: keys.flag("t", "looping"), 20, message="the task to loop")

    result.revoke()

    assert_revoked(result, "revoked")
    assert ["third", "raising", "first"] == keys.hooks("t")
    assert "Cancelled" == keys.flag("t", "exc")
    assert worker.alive()


def test_task_without_checkpoint_runs_to_completion(shared_worker, keys: Keys):
    """(j) A revoked task that never reaches a checkpoint finishes and ends SUCCESS."""
    worker = shared_worker()
    result = worker.send("cit.no_checkpoint", keys.key("t"), 2.0)
    wait_for(lambda: keys.flag("t", "looping"), 20, message="the task to start")

    result.revoke()

    assert "finished" == result.get(timeout=20)
    assert "SUCCESS" == task_meta(result)["status"]
    assert keys.flag("t", "done") == "1"


def test_cancel_unknown_id_is_recorded_and_harmless(shared_worker):
    """(j) `cancel` of an id no one knows: no exception, the ledger records it, workers carry on."""
    from cancellable.celery import cancel

    worker = shared_worker()
    unknown = f"unknown-{uuid.uuid4()}"

    cancel(unknown, reason="typo", app=worker.app)
    worker.barrier()

    assert ledger_keys(unknown), "nothing about the id in Redis besides Celery's result"
    assert worker.alive()
    assert 5 == worker.send("cit.plain.add", 2, 3).get(timeout=20)


def test_cancel_finished_task_keeps_success(shared_worker, keys: Keys):
    """(j) `cancel` of a task that already succeeded: no exception, it stays SUCCESS."""
    from cancellable.celery import cancel

    worker = shared_worker()
    result = worker.send("cit.loop", keys.key("t"), 0.1)
    assert "done" == result.get(timeout=20)

    cancel(result.id, reason="too late", app=worker.app)
    worker.barrier()  # the worker has handled the broadcast

    meta = task_meta(result)
    assert "SUCCESS" == meta["status"]
    assert "done" == meta["result"]
    assert [] == keys.hooks("t")
    # The children that ran it are not left primed to cancel their next task.
    followers = [worker.send("cit.loop", keys.key(f"next{i}"), 0.2) for i in range(2)]
    assert ["done", "done"] == [f.get(timeout=20) for f in followers]


@pytest.mark.parametrize(
    "broker_url", ["amqp://guest:guest@127.0.0.1:1//", "redis://127.0.0.1:1/0"]
)
def test_cancel_with_broker_down_raises_quickly(broker_url):
    """(j) Broker down: `cancel` raises a clear connection error quickly and records nothing."""
    from cancellable.celery import cancel

    app = make_app(
        main=client_app("redis").main,
        broker_url=broker_url,
        backend_url=REDIS_URL,
        queue="cit-unused",
        control_exchange="cit-unused",
        fast_fail=True,
    )
    task_id = str(uuid.uuid4())
    outcome: list[BaseException | object] = []

    def call() -> None:
        try:
            outcome.append(cancel(task_id, reason="broker down", app=app))
        except BaseException as exc:
            outcome.append(exc)

    began = time.monotonic()
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(30)
    elapsed = time.monotonic() - began

    assert not thread.is_alive(), "cancel() did not return within 30 s with the broker down"
    assert 1 == len(outcome)
    exc = outcome[0]
    assert isinstance(exc, (OperationalError, ConnectionError)), f"got {exc!r}"
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert [] == ledger_keys(task_id), "half-done: the ledger recorded a cancel that was not sent"
    app.close()


@pytest.mark.parametrize(
    ("task_or_id", "reason", "error"),
    [
        (None, None, TypeError),
        (123, None, TypeError),
        ("", None, ValueError),
        ("ok-id", 42, TypeError),
        ("ok-id", b"bytes", TypeError),
        ("ok-id", "x" * 4097, ValueError),
        (["ok-id", None], None, TypeError),
    ],
    ids=["None", "int", "empty", "int-reason", "bytes-reason", "long-reason", "list-with-None"],
)
def test_cancel_rejects_bad_arguments_and_does_nothing(task_or_id, reason, error):
    """(j) Bad input raises TypeError/ValueError before anything is recorded."""
    import cancellable
    from cancellable.celery import cancel

    assert 4096 == cancellable.CancelReason.MAX_MESSAGE_LENGTH
    app = client_app("redis")
    marker = f"ok-id-{uuid.uuid4()}"

    def fix(value):
        if value == "ok-id":
            return marker
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    with pytest.raises(error):
        cancel(fix(task_or_id), reason=reason, app=app)

    assert [] == ledger_keys(marker)
    app.close()


def test_cancel_accepts_reason_of_max_length(shared_worker):
    """(j) A reason of exactly MAX_MESSAGE_LENGTH characters is accepted."""
    import cancellable
    from cancellable.celery import cancel

    worker = shared_worker()
    returned = cancel(str(uuid.uuid4()), reason="x" * cancellable.CancelReason.MAX_MESSAGE_LENGTH,
                      app=worker.app)  # fmt: skip

    assert cancellable.CancelReason.MAX_MESSAGE_LENGTH == len(returned.reason.message)


@pytest.mark.parametrize("task", ["cit.plain.soft_limit", "cit.soft_limit"])
def test_soft_time_limit_still_works(shared_worker, keys: Keys, task):
    """Celery's soft time limit (SIGUSR1 in prefork children) is untouched by the library."""
    worker = shared_worker()
    children_before = worker.children()

    result = worker.send(task, keys.key("t"))

    assert "soft-limit" == result.get(timeout=20)
    assert children_before == worker.children()


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"cancellable_ledger_ttl": "7d"}, "cancellable_ledger_ttl='7d'"),
        ({"cancellable_grace_period": 5}, "did you mean cancellable_grace?"),
    ],
)
def test_a_bad_setting_stops_the_worker_start_and_names_it(make_worker, settings, named):
    """(j) ``cancellable_ledger_ttl="7d"`` (or a misspelt setting): the worker does not
    start (it exits non-zero before answering a ping), and its log names the setting.

    Before, such a value silently disabled the integration in that worker.
    """
    worker = make_worker(
        pool="threads", start=False, extra_env={"CIT_SETTINGS": json.dumps(settings)}
    )

    with pytest.raises(RuntimeError, match="exited with") as caught:
        worker.start()

    assert 0 != worker.proc.returncode
    assert "SettingError" in caught.value.args[0], caught.value.args[0]
    assert named in worker.log_path.read_text(errors="replace")
