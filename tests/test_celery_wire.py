"""Reading reasons another version wrote (`cancellable.celery._wire`, issue 18, point 9).

Whatever a revoke payload or a ledger entry holds where a reason should be,
the worker gets a valid `CancelReason` and never an exception: the targets
beside it must survive a rolling upgrade.  The end-to-end proof, through a
real worker's revoke command and its ledger, is ``tests/integration/test_skew.py``.
"""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cancellable import CancelReason
from cancellable.celery._wire import FALLBACK_SOURCE, TRIMMED, reason_from_wire, trim

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "source": st.sampled_from(["revoked", "manual", "deadline", "shutdown", "later"]) | JSON,
        "message": st.text(max_size=5000) | JSON,
        "requested_by": st.text(max_size=300) | JSON,
        "requested_at": st.floats() | JSON,
        "future": JSON,
    },
)


@given(st.one_of(JSON, FIELDS))
def test_any_payload_gives_a_valid_reason(payload: Any) -> None:
    """Any JSON value, or a mapping of any values under the reason's field names and
    others, gives a reason CancelReason itself accepts; what it could read is kept."""
    reason = reason_from_wire(payload, recorded_at=7.0)

    assert CancelReason(**{f: getattr(reason, f) for f in reason.to_dict()}) == reason
    assert math.isfinite(reason.requested_at)
    if isinstance(payload, dict):
        source = payload.get("source")
        if source in ("revoked", "manual", "deadline", "shutdown"):
            assert source == reason.source
        else:
            assert FALLBACK_SOURCE == reason.source
        message = payload.get("message")
        if isinstance(message, str) and len(message) <= CancelReason.MAX_MESSAGE_LENGTH:
            assert message == reason.message


def test_what_is_readable_is_kept_as_written() -> None:
    """A reason this version wrote comes back unchanged."""
    reason = CancelReason(source="deadline", message="m", requested_by="u", requested_at=3.5)

    assert reason == reason_from_wire(reason.to_dict())


def test_what_is_not_readable_degrades() -> None:
    """Unknown source to "revoked", a message or requester of another type dropped,
    texts over the limits trimmed with the mark, a missing time taken from the entry."""
    reason = reason_from_wire(
        {"source": "tomorrow", "message": "x" * 5000, "requested_by": "y" * 300, "v": 2}, 9.0
    )

    assert "revoked" == reason.source
    assert (CancelReason.MAX_MESSAGE_LENGTH, 256) == (
        len(reason.message),
        len(reason.requested_by or ""),
    )
    assert reason.message.endswith(TRIMMED)
    assert 9.0 == reason.requested_at
    assert ("", None) == (
        reason_from_wire({"message": 1, "requested_by": 2}).message,
        reason_from_wire({"message": 1, "requested_by": 2}).requested_by,
    )


def test_trim_keeps_short_texts() -> None:
    """trim() leaves a text at or under the limit alone and cuts a longer one to it,
    with the mark unless the limit is too small to hold it usefully."""
    assert "abc" == trim("abc", 3)
    assert "abcde" == trim("abcdef", 5)
    assert "a" * (30 - len(TRIMMED)) + TRIMMED == trim("a" * 40, 30)
