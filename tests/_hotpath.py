"""Test helper: the bodies `cancellable._scope` switches the hot-path functions between."""

from __future__ import annotations

from types import CodeType
from typing import Any

from cancellable import _scope


def bodies(function: Any) -> tuple[CodeType, CodeType]:
    """The (idle, full) bodies of `checkpoint` or `is_cancelled`.

    Where `_scope._SWITCH_BODIES` is off (CPython 3.13+, other interpreters)
    the function keeps its full body, so both are the same code.
    """
    for switched, idle, full in _scope._SWITCHED:
        if switched is function:
            return idle, full
    assert not _scope._SWITCH_BODIES, f"{function!r} is not switched"
    code: CodeType = function.__code__
    return code, code
