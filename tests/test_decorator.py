"""Tests for ``@cancellable`` on each kind of callable, its options and its calls."""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import inspect
import math
import threading
import time

import pytest

from cancellable import (
    Cancelled,
    CancelScope,
    HookTimeoutError,
    _decorator,
    cancellable,
    checkpoint,
    current_scope,
)


def checkpoint_until_cancelled(limit: float = 5.0) -> None:
    """Call checkpoint() in a loop, as real work does, until it raises."""
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        checkpoint()
    raise AssertionError(f"checkpoint() did not raise within {limit}s")


def body(*bound, x, cancel):
    """What every decorated callable below does: maybe cancel its own scope, then check."""
    scope = current_scope()
    if cancel:
        scope.cancel(f"stop {x}")
    checkpoint()
    return bound, x, scope


@cancellable
def function(x: int, cancel: bool = False) -> tuple:
    """A decorated plain function."""
    return body(x=x, cancel=cancel)


class Service:
    """A class with every kind of decorated method."""

    @cancellable
    def method(self, x: int, cancel: bool = False) -> tuple:
        """A decorated instance method."""
        return body(self, x=x, cancel=cancel)

    @cancellable
    @classmethod
    def outer_classmethod(cls, x: int, cancel: bool = False) -> tuple:
        """@cancellable above @classmethod."""
        return body(cls, x=x, cancel=cancel)

    @classmethod
    @cancellable
    def inner_classmethod(cls, x: int, cancel: bool = False) -> tuple:
        """@cancellable below @classmethod."""
        return body(cls, x=x, cancel=cancel)

    @cancellable
    @staticmethod
    def outer_staticmethod(x: int, cancel: bool = False) -> tuple:
        """@cancellable above @staticmethod."""
        return body(x=x, cancel=cancel)

    @staticmethod
    @cancellable
    def inner_staticmethod(x: int, cancel: bool = False) -> tuple:
        """@cancellable below @staticmethod."""
        return body(x=x, cancel=cancel)


class Undecorated:
    """The same signatures as Service, without the decorator."""

    def method(self, x: int, cancel: bool = False) -> tuple: ...

    @classmethod
    def outer_classmethod(cls, x: int, cancel: bool = False) -> tuple: ...

    inner_classmethod = outer_classmethod

    @staticmethod
    def outer_staticmethod(x: int, cancel: bool = False) -> tuple: ...

    inner_staticmethod = outer_staticmethod


def assert_runs_in_fresh_scopes(call):
    """``call`` returns normally, each time inside its own scope, exited afterwards."""
    outside = current_scope()
    first = call(1)
    second = call(2)

    assert (1, 2) == (first[1], second[1])
    assert first[2] is not None
    assert first[2] is not second[2]
    assert first[2] is not outside
    assert "exited" in repr(first[2])
    assert outside is current_scope()
    return first[0], second[0]


def assert_cancelled_call_raises(call):
    """A call that cancels its own scope raises Cancelled, with the reason, to the caller."""
    with pytest.raises(Cancelled) as exc_info:
        call(7, cancel=True)

    assert "stop 7" == exc_info.value.reason.message
    assert "manual" == exc_info.value.reason.source


class TestFunction:
    def test_call(self):
        """A decorated function runs in a new scope per call and passes no binding."""
        assert ((), ()) == assert_runs_in_fresh_scopes(function)

    def test_cancelled(self):
        """A cancelled call of a function raises Cancelled."""
        assert_cancelled_call_raises(function)

    def test_metadata(self):
        """Name, docstring and the wrapped function are kept."""
        assert "function" == function.__name__
        assert "A decorated plain function." == function.__doc__
        assert callable(function.__wrapped__)


class TestMethod:
    def test_call(self):
        """self is bound as usual."""
        service = Service()

        assert ((service,), (service,)) == assert_runs_in_fresh_scopes(service.method)

    def test_call_through_the_class(self):
        """Calling through the class with an explicit instance works too."""
        service = Service()

        assert (service,) == Service.method(service, 3)[0]

    def test_cancelled(self):
        """A cancelled method call raises Cancelled."""
        assert_cancelled_call_raises(Service().method)


class TestOuterClassmethod:
    def test_call(self):
        """@cancellable above @classmethod binds cls, via the class and via an instance."""
        assert ((Service,), (Service,)) == assert_runs_in_fresh_scopes(Service.outer_classmethod)
        assert ((Service,), (Service,)) == assert_runs_in_fresh_scopes(Service().outer_classmethod)

    def test_cancelled(self):
        """A cancelled classmethod call raises Cancelled."""
        assert_cancelled_call_raises(Service.outer_classmethod)


class TestInnerClassmethod:
    def test_call(self):
        """@cancellable below @classmethod binds cls, via the class and via an instance."""
        assert ((Service,), (Service,)) == assert_runs_in_fresh_scopes(Service.inner_classmethod)
        assert ((Service,), (Service,)) == assert_runs_in_fresh_scopes(Service().inner_classmethod)

    def test_cancelled(self):
        """A cancelled classmethod call raises Cancelled."""
        assert_cancelled_call_raises(Service().inner_classmethod)


class TestOuterStaticmethod:
    def test_call(self):
        """@cancellable above @staticmethod binds nothing."""
        assert ((), ()) == assert_runs_in_fresh_scopes(Service.outer_staticmethod)
        assert ((), ()) == assert_runs_in_fresh_scopes(Service().outer_staticmethod)

    def test_cancelled(self):
        """A cancelled staticmethod call raises Cancelled."""
        assert_cancelled_call_raises(Service.outer_staticmethod)


class TestInnerStaticmethod:
    def test_call(self):
        """@cancellable below @staticmethod binds nothing."""
        assert ((), ()) == assert_runs_in_fresh_scopes(Service.inner_staticmethod)
        assert ((), ()) == assert_runs_in_fresh_scopes(Service().inner_staticmethod)

    def test_cancelled(self):
        """A cancelled staticmethod call raises Cancelled."""
        assert_cancelled_call_raises(Service().inner_staticmethod)


class TestSignature:
    def test_function_signature_unchanged(self):
        """inspect.signature of a decorated function equals the original's."""

        def original(a: int, b: str = "x", *args: int, c: float, **kwargs: str) -> str:
            return b

        assert inspect.signature(original) == inspect.signature(cancellable(original))
        assert inspect.signature(original) == inspect.signature(cancellable(timeout=1)(original))

    @pytest.mark.parametrize(
        "name",
        [
            "method",
            "outer_classmethod",
            "inner_classmethod",
            "outer_staticmethod",
            "inner_staticmethod",
        ],
    )
    def test_method_signatures_unchanged(self, name):
        """Bound and unbound signatures match the undecorated twin for each kind of method."""
        assert inspect.signature(getattr(Undecorated, name)) == inspect.signature(
            getattr(Service, name)
        )
        assert inspect.signature(getattr(Undecorated(), name)) == inspect.signature(
            getattr(Service(), name)
        )


class TestForms:
    def test_bare_and_called_forms(self):
        """@cancellable, @cancellable() and @cancellable(...) all decorate."""

        @cancellable
        def bare():
            return current_scope()

        @cancellable()
        def empty_call():
            return current_scope()

        @cancellable(timeout=60)
        def with_options():
            return current_scope()

        scopes = [bare(), empty_call(), with_options()]

        assert all(isinstance(scope, CancelScope) for scope in scopes)
        assert [math.inf, math.inf] == [scopes[0].deadline, scopes[1].deadline]
        assert math.isfinite(scopes[2].deadline)

    @pytest.mark.parametrize("target", [42, "f", None.__class__()])
    def test_non_callable_target(self, target):
        """Decorating something that is not callable is a TypeError."""
        with pytest.raises(TypeError, match="can only decorate callables"):
            cancellable()(target)


class TestTimeout:
    def test_timeout_cancels_the_call(self):
        """timeout= cancels the call with source 'deadline'; the caller gets Cancelled."""

        @cancellable(timeout=0.05)
        def slow():
            checkpoint_until_cancelled()

        started = time.monotonic()
        with pytest.raises(Cancelled) as exc_info:
            slow()

        assert "deadline" == exc_info.value.reason.source
        assert 0.04 <= time.monotonic() - started < 3.0

    def test_timeout_per_call(self):
        """Each call gets its own deadline, counted from the call."""

        @cancellable(timeout=60)
        def deadline():
            return current_scope().deadline

        first = deadline()
        threading.Event().wait(0.02)
        second = deadline()

        assert second > first

    @pytest.mark.parametrize(
        ("value", "error"),
        [
            (-1, ValueError),
            (float("nan"), ValueError),
            (math.inf, ValueError),
            (True, TypeError),
            ("10", TypeError),
        ],
    )
    def test_bad_timeout(self, value, error):
        """A bad timeout is rejected when decorating, not at the first call."""
        with pytest.raises(error, match="timeout"):
            cancellable(timeout=value)


class TestOnCancelOption:
    def test_hook_runs_when_cancelled(self):
        """on_cancel= runs when the call is cancelled."""
        ran = []

        @cancellable(on_cancel=lambda: ran.append("cleanup"))
        def work(cancel):
            return body(x=1, cancel=cancel)

        work(False)
        with pytest.raises(Cancelled):
            work(True)
        with pytest.raises(Cancelled):
            work(True)

        assert ["cleanup", "cleanup"] == ran

    def test_hook_runs_before_hooks_registered_earlier(self):
        """The option's hook is registered first, so it runs after the body's own hooks."""
        from cancellable import on_cancel

        ran = []

        @cancellable(on_cancel=lambda: ran.append("option"))
        def work():
            on_cancel(ran.append, "body")
            current_scope().cancel()
            checkpoint()

        with pytest.raises(Cancelled):
            work()

        assert ["body", "option"] == ran

    def test_not_callable(self):
        """on_cancel= must be callable."""
        with pytest.raises(TypeError, match="on_cancel must be a callable or None, got int"):
            cancellable(on_cancel=1)


class TestHookTimeoutOption:
    def test_budget_applies_to_the_call(self):
        """hook_timeout= bounds the call's hooks; the timeout shows in hook_errors.

        (The hook stops at its checkpoint: outside a process that will be
        retired a budget never raises at an arbitrary bytecode.)
        """

        def hang():
            give_up = time.monotonic() + 10
            while time.monotonic() < give_up:
                checkpoint()

        @cancellable(hook_timeout=0.1, on_cancel=hang)
        def work():
            current_scope().cancel()
            checkpoint()

        started = time.monotonic()
        with pytest.raises(Cancelled) as exc_info:
            work()

        assert [HookTimeoutError] == [type(error) for error in exc_info.value.hook_errors]
        assert time.monotonic() - started < 3.0

    def test_default_and_none(self):
        """The default follows configure(); None means unbounded."""
        import cancellable as package

        package.configure(hook_timeout=7)

        @cancellable
        def default():
            return current_scope().hook_timeout

        @cancellable(hook_timeout=None)
        def unbounded():
            return current_scope().hook_timeout

        assert (7.0, None) == (default(), unbounded())

    def test_default_sentinel_is_the_default(self):
        """Passing DEFAULT explicitly is the same as leaving the option out, for
        hook_timeout and grace."""
        import cancellable as package

        package.configure(hook_timeout=7)

        @cancellable(hook_timeout=package.DEFAULT, grace=package.DEFAULT)
        def explicit():
            return current_scope().hook_timeout

        assert 7.0 == explicit()
        assert package.DEFAULT is explicit._self_cancellable_options.grace
        assert "DEFAULT" == repr(package.DEFAULT)

    @pytest.mark.parametrize(
        ("value", "error"),
        [(-1, ValueError), (math.inf, ValueError), ("x", TypeError), ("default", TypeError)],
    )
    @pytest.mark.parametrize("option", ["hook_timeout", "grace"])
    def test_bad_hook_timeout_or_grace(self, option, value, error):
        """A bad hook_timeout or grace is rejected when decorating; the string
        "default" is not the DEFAULT sentinel."""
        with pytest.raises(error, match=option):
            cancellable(**{option: value})


class TestCancelledCall:
    def test_cancelled_from_another_thread(self, spawn):
        """Cancelling a running call from another thread raises Cancelled in its caller."""
        started = threading.Event()
        box = {}

        @cancellable
        def work():
            box["scope"] = current_scope()
            started.set()
            checkpoint_until_cancelled()
            return "finished"  # pragma: no cover - must not return

        runner = spawn(work)
        assert started.wait(5)
        box["scope"].cancel("from outside")

        with pytest.raises(Cancelled) as exc_info:
            runner.result()
        assert "from outside" == exc_info.value.reason.message
        assert not box["scope"].cancelled_caught

    def test_cancelled_call_inside_an_uncancelled_scope_propagates(self):
        """The call's Cancelled does not belong to the caller's scope, which lets it pass."""
        with pytest.raises(Cancelled), CancelScope() as outer:
            function(1, cancel=True)

        assert not outer.cancelled_caught

    def test_outer_cancellation_reaches_the_call(self):
        """A call inside a cancelled scope is cancelled too, and that scope catches it."""
        with CancelScope() as outer:
            outer.cancel("outer")
            function(1)

        assert outer.cancelled_caught

    def test_concurrent_calls_are_independent(self, spawn):
        """Calls on several threads each get their own scope; cancelling one leaves the rest."""
        count = 4
        barrier = threading.Barrier(count + 1)
        go = threading.Event()
        scopes = {}

        @cancellable
        def work(index):
            scopes[index] = current_scope()
            barrier.wait(5)
            assert go.wait(5)
            for _ in range(200):
                checkpoint()
            return index

        runners = [spawn(work, index) for index in range(count)]
        barrier.wait(5)
        scopes[1].cancel("just one")
        go.set()
        outcomes = []
        for runner in runners:
            try:
                outcomes.append(runner.result())
            except Cancelled as exc:
                outcomes.append(exc.reason.message)

        assert [0, "just one", 2, 3] == outcomes
        assert count == len({id(scope) for scope in scopes.values()})


class TestCallRunner:
    def test_integration_can_take_over_a_call(self, monkeypatch):
        """A registered call runner that claims a call runs it instead of the default."""
        seen = []

        def runner(wrapped, args, kwargs, options):
            seen.append((args, kwargs, options.timeout))
            return _decorator.run_in_scope(wrapped, args, kwargs, options, scope=CancelScope())

        claims = iter([runner, None])
        monkeypatch.setattr(_decorator, "_claims", (lambda: next(claims),))

        @cancellable(timeout=60)
        def work(x, y=0):
            return current_scope().deadline

        claimed = work(1, y=2)
        unclaimed = work(3)

        assert [((1,), {"y": 2}, 60.0)] == seen
        assert math.inf == claimed
        assert math.isfinite(unclaimed)

    def test_no_runner_registered(self, monkeypatch):
        """Without an integration, every call runs in the decorator's own scope."""
        monkeypatch.setattr(_decorator, "_claims", ())

        @cancellable(timeout=60)
        def work():
            return current_scope().deadline

        assert math.isfinite(work())


class TestRegisterTaskRunner:
    def test_claims_are_asked_in_order_and_registered_once(self, monkeypatch):
        """The first claim that returns a runner wins; registering twice adds nothing."""
        monkeypatch.setattr(_decorator, "_claims", ())
        asked = []

        def declines():
            asked.append("declines")

        def takes():
            asked.append("takes")
            return lambda wrapped, args, kwargs, options: "taken"

        _decorator.register_task_runner(declines)
        _decorator.register_task_runner(takes)
        _decorator.register_task_runner(declines)

        assert "taken" == cancellable(lambda: "own")()
        assert ["declines", "takes"] == asked
        assert (declines, takes) == _decorator._claims
