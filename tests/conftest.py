"""Shared fixtures: reset global settings, catch leaked scopes, run threads."""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from tests import redis_dbs

from cancellable import _config, _scope


def _leaked_state() -> dict[str, object]:
    """What the scope bookkeeping holds that a finished test should have released."""
    leaks: dict[str, object] = {}
    if _scope._pending:
        leaks["_pending"] = True
    if _scope._shared_work:
        leaks["_shared_work"] = True
    if _scope._cancelled_live:
        leaks["_cancelled_live"] = _scope._cancelled_live
    if _scope._deferred:
        leaks["_deferred"] = list(_scope._deferred)
    if _scope._probes:
        leaks["_probes"] = list(_scope._probes)
    stack = _scope._get_stack()
    if stack:
        leaks["stack"] = list(stack)
    if _scope.current_scope() is not None:
        leaks["innermost"] = _scope.current_scope()
    return leaks


def _repair_state() -> None:
    """Put the bookkeeping back to empty, so one leaking test fails only itself."""
    with _scope._lock:
        _scope._get_stack().clear()
        _scope._local.innermost = None
        _scope._cancelled_live = 0
        _scope._deferred.clear()
        _scope._probes.clear()
        _scope._update_pending()


@pytest.fixture(autouse=True)
def _reset_cancellable() -> Iterator[None]:
    """Start each test with default settings; fail it if it leaked a scope."""
    _config.reset_defaults()
    yield
    leaks = _leaked_state()
    _repair_state()
    _config.reset_defaults()

    assert {} == leaks, "the test left cancel scopes or pending work behind"


class ThreadRunner:
    """A thread that keeps the return value or exception of its target."""

    def __init__(self, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._target = target
        self._args = args
        self._value: Any = None
        self._error: BaseException | None = None
        self._collected = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self._value = self._target(*self._args)
        except BaseException as exc:
            self._error = exc

    def result(self, timeout: float = 10.0) -> Any:
        """Wait for the thread; return what the target returned or raise what it raised."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"thread running {self._target!r} did not finish in {timeout}s")
        self._collected = True
        if self._error is not None:
            raise self._error
        return self._value

    def check_finished(self) -> None:
        """At teardown: the thread must have ended, and an error nobody collected fails the test."""
        self.thread.join(10.0)
        if self.thread.is_alive():
            raise AssertionError(f"thread running {self._target!r} is still running")
        if self._error is not None and not self._collected:
            raise AssertionError(f"thread running {self._target!r} failed") from self._error


@pytest.fixture(name="spawn")
def _spawn() -> Iterator[Callable[..., ThreadRunner]]:
    """Start ``target(*args)`` on a new thread; errors surface in ``result()`` or at teardown."""
    runners: list[ThreadRunner] = []

    def spawn(target: Callable[..., Any], *args: Any) -> ThreadRunner:
        runner = ThreadRunner(target, args)
        runners.append(runner)
        runner.thread.start()
        return runner

    yield spawn
    for runner in runners:
        runner.check_finished()


@pytest.fixture(name="rdb")
def rdb_fixture() -> Iterator[redis.Redis]:
    """The unit tests' Redis database (`redis_dbs.UNIT_DB`), flushed before and after."""
    url = redis_dbs.url(redis_dbs.UNIT_DB)
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"Redis is not answering on {url}: {exc}. Start redis-server.")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()
