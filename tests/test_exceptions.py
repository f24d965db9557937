"""Tests for CancelReason, Cancelled, TooSlowError and HookTimeoutError."""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import dataclasses
import math
import pickle
import time

import pytest

from cancellable import (
    Cancelled,
    CancelReason,
    HookTimeoutError,
    TooSlowError,
)


class NeedsTwoArguments(Exception):
    """An exception that pickles but cannot be unpickled (its __init__ wants two arguments)."""

    def __init__(self, a, b):
        super().__init__(a)
        self.b = b


class TestCancelled:
    def test_is_base_exception_not_exception(self):
        """Cancelled escapes ``except Exception`` like KeyboardInterrupt does."""
        caught_by = None
        try:
            try:
                raise Cancelled()
            except Exception:  # pragma: no cover - must not catch it
                caught_by = "Exception"
        except BaseException:
            caught_by = "BaseException"

        assert issubclass(Cancelled, BaseException)
        assert not issubclass(Cancelled, Exception)
        assert "BaseException" == caught_by

    def test_default_reason(self):
        """Cancelled() carries an empty manual reason and no hook errors."""
        exc = Cancelled()

        assert ("manual", "", None) == (
            exc.reason.source,
            exc.reason.message,
            exc.reason.requested_by,
        )
        assert () == exc.hook_errors
        assert (exc.reason,) == exc.args

    def test_str_and_repr(self):
        """str() describes the reason; repr() shows the CancelReason."""
        reason = CancelReason(source="revoked", message="stop", requested_by="alice")
        exc = Cancelled(reason)

        assert "cancelled (revoked by alice: stop)" == str(exc)
        assert f"Cancelled({reason!r})" == repr(exc)
        assert "cancelled (manual)" == str(Cancelled())

    def test_needs_a_cancel_reason(self):
        """Cancelled refuses anything but a CancelReason (or None)."""
        with pytest.raises(TypeError, match="Cancelled needs a CancelReason, got str"):
            Cancelled("stop")

    def test_pickle_round_trip(self):
        """Pickling keeps the reason and the hook errors."""
        reason = CancelReason(source="deadline", message="late", requested_by="timer")
        exc = Cancelled(reason)
        exc.hook_errors = (ValueError("hook"), HookTimeoutError("slow"))

        copy = pickle.loads(pickle.dumps(exc))

        assert reason == copy.reason
        assert [(ValueError, ("hook",)), (HookTimeoutError, ("slow",))] == [
            (type(error), error.args) for error in copy.hook_errors
        ]
        assert isinstance(copy, Cancelled)

    @pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
    def test_pickle_every_protocol(self, protocol):
        """Every pickle protocol round-trips a Cancelled."""
        exc = Cancelled(CancelReason(message="x"))

        assert exc.reason == pickle.loads(pickle.dumps(exc, protocol)).reason

    def test_pickle_with_a_hook_error_that_cannot_be_unpickled(self):
        """A hook error that would not survive pickling is replaced by a description.

        Regression: such an error used to make the whole Cancelled fail to
        unpickle on the far side (a result backend, a parent process).
        """
        exc = Cancelled(CancelReason(message="x"))
        portable = ValueError("fine")
        exc.hook_errors = (NeedsTwoArguments(1, 2), portable)

        copy = pickle.loads(pickle.dumps(exc))

        assert exc.reason == copy.reason
        assert RuntimeError is type(copy.hook_errors[0])
        assert "NeedsTwoArguments(1)" in str(copy.hook_errors[0])
        assert (ValueError, ("fine",)) == (type(copy.hook_errors[1]), copy.hook_errors[1].args)
        assert NeedsTwoArguments is type(exc.hook_errors[0]), "the original is untouched"


class TestCancelReason:
    def test_defaults(self):
        """A bare reason is manual, empty, anonymous and stamped with the current time."""
        before = time.time()
        reason = CancelReason()
        after = time.time()

        assert ("manual", "", None) == (reason.source, reason.message, reason.requested_by)
        assert before <= reason.requested_at <= after

    def test_immutable(self):
        """Fields cannot be changed after construction."""
        reason = CancelReason()

        with pytest.raises(dataclasses.FrozenInstanceError):
            reason.message = "changed"

    def test_pickle(self):
        """A reason pickles to an equal reason."""
        reason = CancelReason(source="shutdown", message="m", requested_by="x", requested_at=1.5)

        assert reason == pickle.loads(pickle.dumps(reason))

    @pytest.mark.parametrize("source", ["revoked", "deadline", "manual", "shutdown"])
    def test_every_source(self, source):
        """Each documented source is accepted."""
        assert source == CancelReason(source=source).source

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"source": "cancelled"}, ValueError, "source must be one of"),
            ({"source": "MANUAL"}, ValueError, "source must be one of"),
            ({"source": "parent"}, ValueError, "source must be one of"),
            ({"source": 1}, TypeError, "source must be a str, got int"),
            ({"message": b"bytes"}, TypeError, "message must be a str, got bytes"),
            ({"message": None}, TypeError, "message must be a str, got NoneType"),
            (
                {"message": "x" * (CancelReason.MAX_MESSAGE_LENGTH + 1)},
                ValueError,
                f"the limit is {CancelReason.MAX_MESSAGE_LENGTH}",
            ),
            ({"requested_by": 7}, TypeError, "requested_by must be a str or None"),
            ({"requested_by": "x" * 257}, ValueError, "requested_by is longer than 256"),
            ({"requested_at": "now"}, TypeError, "requested_at must be a number"),
            ({"requested_at": True}, TypeError, "requested_at must be a number"),
            ({"requested_at": math.nan}, ValueError, "requested_at must be finite"),
            ({"requested_at": math.inf}, ValueError, "requested_at must be finite"),
        ],
    )
    def test_validation(self, kwargs, error, match):
        """Wrong types are TypeErrors, bad values ValueErrors, each naming the field."""
        with pytest.raises(error, match=match):
            CancelReason(**kwargs)

    def test_longest_message_is_accepted(self):
        """A message of exactly CancelReason.MAX_MESSAGE_LENGTH characters is fine."""
        assert CancelReason.MAX_MESSAGE_LENGTH == len(
            CancelReason(message="x" * CancelReason.MAX_MESSAGE_LENGTH).message
        )

    def test_coerce(self):
        """coerce() turns None, str and CancelReason into a reason."""
        reason = CancelReason(message="kept")

        assert reason is CancelReason.coerce(reason)
        assert ("manual", "text") == (
            CancelReason.coerce("text").source,
            CancelReason.coerce("text").message,
        )
        assert "shutdown" == CancelReason.coerce(None, default_source="shutdown").source
        assert ("revoked", "t") == (
            CancelReason.coerce("t", default_source="revoked").source,
            CancelReason.coerce("t", default_source="revoked").message,
        )

    @pytest.mark.parametrize("value", [1, b"bytes", {"message": "x"}, 1.5, ["x"]])
    def test_coerce_rejects_other_types(self, value):
        """coerce() refuses ints, bytes, dicts and anything else with a TypeError."""
        with pytest.raises(TypeError, match="reason must be None, a str or a CancelReason"):
            CancelReason.coerce(value)

    def test_dict_round_trip(self):
        """to_dict() and from_dict() are inverses."""
        reason = CancelReason(source="revoked", message="m", requested_by="r", requested_at=12.5)

        assert {
            "source": "revoked",
            "message": "m",
            "requested_by": "r",
            "requested_at": 12.5,
        } == reason.to_dict()
        assert reason == CancelReason.from_dict(reason.to_dict())

    def test_from_dict_defaults_and_unknown_keys(self):
        """from_dict() fills in missing fields and ignores unknown keys."""
        reason = CancelReason.from_dict({"message": None, "extra": 1})

        assert ("manual", "", None) == (reason.source, reason.message, reason.requested_by)

    def test_from_dict_validates(self):
        """from_dict() validates like the constructor."""
        with pytest.raises(ValueError, match="source must be one of"):
            CancelReason.from_dict({"source": "nope"})

    @pytest.mark.parametrize(
        ("kwargs", "expected"),
        [
            ({}, "manual"),
            ({"message": "m"}, "manual: m"),
            ({"requested_by": "bob"}, "manual by bob"),
            ({"source": "revoked", "message": "m", "requested_by": "bob"}, "revoked by bob: m"),
        ],
    )
    def test_describe(self, kwargs, expected):
        """describe() is a one-line summary."""
        assert expected == CancelReason(**kwargs).describe()


class TestOtherExceptions:
    def test_too_slow_error_is_an_exception(self):
        """TooSlowError is an ordinary error, like trio's."""
        assert issubclass(TooSlowError, Exception)

    def test_hook_timeout_error_is_not_an_exception(self):
        """HookTimeoutError escapes a hook's ``except Exception``."""
        assert issubclass(HookTimeoutError, BaseException)
        assert not issubclass(HookTimeoutError, Exception)
