"""Instructions of the per-thread lookups a checkpoint could use, beside an empty call.

The checkpoint's pending path must find out which thread is asking (see
"What the numbers say" in ``docs/performance.md``).  This counts, with
callgrind as `instructions.py` does (two loop lengths, the difference per
iteration), what each candidate adds to a function call, as a ratio to the
cost of an empty call::

    python benchmarks/lookups.py python3.10 python3.11 python3.12 python3.13

It needs only the interpreters and valgrind (not `cancellable`).  Prints a
Markdown table.  Run with ``--one NAME LOOPS`` it is the program valgrind runs.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from _thread import get_ident
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from instructions import callgrind, version

SHORT, LONG = 20_000, 120_000


class _Scope:
    __slots__ = ("_effective_reason",)

    def __init__(self) -> None:
        self._effective_reason = None


class _SubLocal(threading.local):
    def __init__(self) -> None:
        self.innermost = _Scope()


_plain = threading.local()
_plain.innermost = _Scope()
_sub = _SubLocal()
_var: contextvars.ContextVar[_Scope] = contextvars.ContextVar("lookups")
_var.set(_Scope())


def empty() -> None:
    """The baseline: a call that does nothing."""


def plain_local() -> None:
    """What the pending path reads: a plain ``threading.local`` and a slot."""
    _plain.innermost._effective_reason  # noqa: B018 - the read is the point


def subclass_local() -> None:
    """The same read through a ``threading.local`` subclass with ``__init__``."""
    _sub.innermost._effective_reason  # noqa: B018


def thread_ident() -> None:
    """``get_ident()``, the start of any lookup keyed by thread."""
    get_ident()


def context_var() -> None:
    """A ``ContextVar`` read (cheaper, but follows contexts, not threads)."""
    _var.get()._effective_reason  # noqa: B018


CASES = {f.__name__: f for f in (empty, plain_local, subclass_local, thread_ident, context_var)}


def _loop(fn: object, loops: int) -> None:
    call = fn if callable(fn) else None
    if call is None:
        for _ in range(loops):
            pass
    else:
        for _ in range(loops):
            call()


def count(python: str, name: str, loops: int) -> int:
    """Instructions valgrind counted for one run of ``name``."""
    return callgrind(python, __file__, name, loops)


def per_iteration(python: str, name: str) -> float:
    """Instructions per loop iteration of ``name`` (``loop``: the bare loop)."""
    return (count(python, name, LONG) - count(python, name, SHORT)) / (LONG - SHORT)


def table(pythons: list[str]) -> str:
    """Net instructions each lookup adds to a call, and that over an empty call."""
    names = [name for name in CASES if name != "empty"]
    lines = [
        "| CPython | empty call (net) | "
        + " | ".join(f"`{n}` adds | x empty" for n in names)
        + " |",
        "|---" * (2 + 2 * len(names)) + "|",
    ]
    for python in pythons:
        loop = per_iteration(python, "loop")
        call = per_iteration(python, "empty") - loop
        cells = [version(python), f"{call:.0f}"]
        for name in names:
            added = per_iteration(python, name) - loop - call
            cells += [f"{added:.0f}", f"{added / call:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Print the table for the interpreters in ``argv`` (default: this one)."""
    if argv[:1] == ["--one"]:
        _loop(CASES.get(argv[1]), int(argv[2]))
        return
    print(table(argv or [sys.executable]))


if __name__ == "__main__":
    main(sys.argv[1:])
