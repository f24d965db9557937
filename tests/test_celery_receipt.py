"""`cancellable.celery._receipt`: how a REVOKED message is read back into an outcome."""

from __future__ import annotations

import pytest

from cancellable.celery import Outcome, TaskOutcome
from cancellable.celery._receipt import ended_by, ending_note


@pytest.mark.parametrize(
    ("message", "outcome"),
    [
        ("revoked by alice: stop", Outcome.DISCARDED),
        ("revoked", Outcome.DISCARDED),
        ("revoked: stop (stopped at a checkpoint after 45 ms)", Outcome.STOPPED),
        ("revoked: stop (stopped at a checkpoint after 2.5 s)", Outcome.STOPPED),
        ("timeout: deadline (stopped at a checkpoint)", Outcome.STOPPED),
        ("revoked: too slow (interrupted after 1.0 s)", Outcome.INTERRUPTED),
        ("revoked: runaway (terminated after 11.0 s)", Outcome.TERMINATED),
        ("terminated", Outcome.TERMINATED),
        ("revoked: a user's text (interrupted after lunch)", Outcome.DISCARDED),
    ],
)
def test_the_note_the_worker_writes_is_read_back(message: str, outcome: Outcome) -> None:
    """Each ending's note (and only a note at the end, in its exact form) names the outcome."""
    assert outcome == ended_by(message)


def test_ending_note_round_trips() -> None:
    """What the worker writes for a checkpoint stop reads back as STOPPED."""
    assert "stopped at a checkpoint after 300 ms" == ending_note(10.0, 10.3)
    assert "stopped at a checkpoint after 2.5 s" == ending_note(10.0, 12.5)
    for note in (ending_note(10.0, 10.3), ending_note(10.0, 12.5), ending_note(None, 3.0)):
        assert Outcome.STOPPED == ended_by(f"revoked: x ({note})")


def test_describe_says_each_outcome() -> None:
    """The line celery cancel prints for each outcome."""
    lines = {
        o: TaskOutcome("t", o, "REVOKED" if o != Outcome.UNOBSERVED else "SUCCESS", "m").describe()
        for o in Outcome
    }
    assert "stopped at a checkpoint (REVOKED: m)" == lines[Outcome.STOPPED]
    assert "discarded before it started (REVOKED: m)" == lines[Outcome.DISCARDED]
    assert lines[Outcome.UNOBSERVED].startswith("finished (SUCCESS) after the cancellation")
    assert lines[Outcome.UNKNOWN].startswith("unknown (not seen by any online worker)")
    assert len(set(lines.values())) == len(Outcome)
    noted = TaskOutcome("t", Outcome.INTERRUPTED, "REVOKED", "revoked: x (interrupted after 1.0 s)")
    assert "interrupted after 1.0 s (REVOKED: revoked: x)" == noted.describe()
