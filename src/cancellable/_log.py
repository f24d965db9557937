"""The library's one logger.  Never configured here: see `cancellable.events`."""

from __future__ import annotations

import structlog

from .events import LOGGER_NAME

__all__ = ["logger"]

#: A lazy proxy: structlog resolves the user's configuration at each call,
#: so configuring structlog after importing `cancellable` works.
logger = structlog.get_logger(LOGGER_NAME)
