"""The soak's pytest wiring: the ``soak`` marker (registered here, since the
project's marker list in pyproject.toml belongs to someone else)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "soak: the randomized soak over real prefork workers and a private Redis "
        "(CANCELLABLE_SOAK=long for the long mode; see docs/reliability.md)",
    )
