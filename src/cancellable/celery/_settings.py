"""Every ``cancellable_*`` setting of a Celery app, read and validated in one place.

`Settings` holds one typed field per setting.  `Settings.from_conf` builds
it from an app's configuration (``app.conf``) and `settings_for` does so
once per app.  Every rule lives here: positive finite seconds where a
duration must be positive, non-negative finite seconds (or None) for the
grace and the kill delay, real booleans, a ledger URL of a scheme the
ledger can open, a wake-up signal that billiard leaves alone.  A bad value,
or a ``cancellable_*`` key that is not a setting (a typo such as
``cancellable_grace_period``), raises `SettingError`, which names the
setting, the value and what is accepted, and is a Celery
``ImproperlyConfigured``: a worker with a bad setting does not start.

The reference table is :doc:`/settings`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import signal
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from celery.exceptions import ImproperlyConfigured

from .._config import MAX_GRACE

__all__ = [
    "DEFAULT_CANCEL_TIMEOUT",
    "DEFAULT_KILL_AFTER",
    "DEFAULT_LEDGER_TTL",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_WAKEUP_SIGNAL",
    "MAX_GRACE",
    "PREFIX",
    "SETTINGS",
    "SettingError",
    "Settings",
    "forget_settings",
    "settings_for",
    "sql_url",
]

#: The prefix of every setting's name in ``app.conf``.
PREFIX: Final = "cancellable_"

#: How long a cancellation is remembered, in seconds (one week).
DEFAULT_LEDGER_TTL: Final = 7 * 24 * 3600.0

#: How often a worker reads the ledger, in seconds.
DEFAULT_POLL_INTERVAL: Final = 2.0

#: Seconds from the interrupt to the terminate step of the ladder.
DEFAULT_KILL_AFTER: Final = 10.0

#: The longest `cancel` waits for the broker and the ledger together, in seconds.
DEFAULT_CANCEL_TIMEOUT: Final = 6.0

#: The signal that wakes a prefork child (None where the platform has no SIGURG).
#: (The module's attribute, not the enum's: a platform without it has no such signal.)
DEFAULT_WAKEUP_SIGNAL: Final[signal.Signals | None] = (
    signal.Signals(signal.SIGURG) if hasattr(signal, "SIGURG") else None
)

#: The signals a wake-up signal may be: those whose default action is to
#: ignore them.  A child is signalled from the moment it is forked, before it
#: has installed the handler (and after a task reset it): a signal whose
#: default action terminates, dumps core or stops the process (SIGRTMIN,
#: SIGIO, SIGPWR, SIGTSTP, ...) would kill or stop it.  Of those ignored by
#: default, SIGCHLD is left out (the kernel sends it whenever a process the
#: task started ends, and libraries install their own handler for it), and
#: so is SIGCONT (job control).  Billiard uses none of these in pool children.
WAKEUP_SIGNALS: Final = frozenset(
    getattr(signal.Signals, name)
    for name in ("SIGURG", "SIGWINCH", "SIGINFO")
    if hasattr(signal.Signals, name)
)


class SettingError(ImproperlyConfigured, ValueError):  # type: ignore[misc]  # Celery is untyped
    """A ``cancellable_*`` setting has an invalid value, or is not a setting.

    The message names each offending setting, its value and what is
    accepted, one per line.  A subclass of Celery's
    ``ImproperlyConfigured`` (a worker reports it as a configuration error)
    and of `ValueError`.

    Attributes:
        settings: The names of the offending settings, as written in the
            configuration.
    """

    def __init__(self, problems: Iterable[tuple[str, str]]) -> None:
        pairs = tuple(problems)
        self.settings: tuple[str, ...] = tuple(name for name, _ in pairs)
        super().__init__("\n".join(text for _, text in pairs))


class _Invalid(Exception):
    """Raised by a parser: the value is not accepted (the spec says what is)."""


def _seconds(value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid
    try:
        seconds = float(value)
    except OverflowError:
        raise _Invalid from None
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        raise _Invalid
    return seconds


def _positive_seconds(value: object) -> float:
    return _seconds(value, positive=True)


def _seconds_or_none(value: object) -> float | None:
    return None if value is None else _seconds(value, positive=False)


def _grace(value: object) -> float | None:
    seconds = _seconds_or_none(value)
    if seconds is not None and seconds > MAX_GRACE:
        raise _Invalid
    return seconds


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid
    return value


#: The URL schemes the ledger opens (`cancellable.celery._ledger`).
_LEDGER_SCHEMES: Final = (
    "redis://",
    "rediss://",
    "unix://",
    "socket://",
    "sentinel://",
    "file://",
)


#: A database URL the SQL ledger opens (`cancellable.celery._ledger_sql`):
#: SQLAlchemy's spelling, optionally with Celery's ``db+`` in front.
_SQL_URL: Final = re.compile(
    r"^(?:db\+)?(?P<dialect>postgres|postgresql|mysql|mariadb|sqlite)(?P<driver>\+\w+)?://",
    re.IGNORECASE,
)


def sql_url(url: str) -> str | None:
    """``url`` as SQLAlchemy spells it if it names a database the SQL ledger opens, else None.

    Drops Celery's ``db+`` and turns ``postgres://`` (Heroku's spelling,
    which SQLAlchemy refuses) into ``postgresql://``.
    """
    match = _SQL_URL.match(url)
    if match is None:
        return None
    dialect = match["dialect"].lower()
    dialect = "postgresql" if dialect == "postgres" else dialect
    return f"{dialect}{match['driver'] or ''}://{url[match.end() :]}"


def _ledger_url(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Invalid
    if value.lower() == "none":
        return "none"
    if sql_url(value) is not None:
        return value
    if not value.startswith(_LEDGER_SCHEMES):
        raise _Invalid
    try:
        # Several sentinels: sentinel://h1:p1;sentinel://h2:p2 (kombu's spelling).
        for chunk in value.split(";") if value.startswith("sentinel://") else [value]:
            if not chunk.strip().startswith("sentinel://") and chunk is not value:
                raise _Invalid("several URLs joined by ';' must all be sentinel:// URLs")
            urllib.parse.urlsplit(chunk.strip()).port  # noqa: B018 - ValueError if not a number
        parts = urllib.parse.urlsplit(value)
    except ValueError:
        raise _Invalid from None
    if parts.scheme == "file":
        # file://tmp/x names the host "tmp" and the path "/x" (Celery's
        # filesystem backend reads it as the relative path "tmp/x"): refuse
        # it, and say why.
        if parts.netloc not in ("", "localhost"):
            raise _Invalid(
                "it names no absolute path: a URL parser reads "
                f"{parts.netloc!r} as a host name, Celery's filesystem backend as a directory "
                "relative to each process's working directory; write file:///absolute/path "
                "(three slashes)"
            )
        if not parts.path.startswith("/"):
            raise _Invalid
    elif parts.scheme == "unix" and not parts.path:
        raise _Invalid
    return value


def _wakeup_signal(value: object) -> signal.Signals | None:
    if value is None:
        return DEFAULT_WAKEUP_SIGNAL
    if isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            chosen = signal.Signals[name]
        except KeyError:
            raise _Invalid from None
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            chosen = signal.Signals(value)
        except ValueError:
            raise _Invalid from None
    else:
        raise _Invalid
    if chosen not in WAKEUP_SIGNALS:
        raise _Invalid(
            f"{chosen.name}'s default action is not to ignore it"
            if chosen not in (signal.SIGCHLD, getattr(signal, "SIGCONT", None))
            else f"{chosen.name} is sent by the system on its own"
        )
    return chosen


@dataclasses.dataclass(frozen=True)
class _Spec:
    """How one setting is read: its parser, what it accepts, what None means."""

    parse: Callable[[object], Any]
    accepted: str
    #: None in the configuration means "the default" (else None is a value).
    none_is_default: bool = True


_SPECS: Final[Mapping[str, _Spec]] = {
    "ledger_url": _Spec(
        _ledger_url,
        "a redis://, rediss://, unix://, sentinel:// (several joined by ';') or "
        "file:///absolute/path URL, a database URL "
        "(postgresql://, mysql://, sqlite:///path, with a +driver if wanted), 'none' (no ledger), "
        "or None (the app's Redis, filesystem or database result backend, else its Redis broker)",
    ),
    "ledger_ttl": _Spec(_positive_seconds, "a positive number of seconds"),
    "cancel_timeout": _Spec(_positive_seconds, "a positive number of seconds"),
    "poll_interval": _Spec(_positive_seconds, "a positive number of seconds"),
    "grace": _Spec(
        _grace,
        f"a number of seconds from 0 to {MAX_GRACE:.0f} (one day), or None (cooperative only)",
        none_is_default=False,
    ),
    "kill_after": _Spec(
        _seconds_or_none,
        "a number of seconds >= 0, or None (never terminate)",
        none_is_default=False,
    ),
    "kill_process_group": _Spec(_flag, "True or False"),
    "cancel_siblings_on_failure": _Spec(_flag, "True or False"),
    "shutdown_grace": _Spec(
        _grace,
        f"a number of seconds from 0 to {MAX_GRACE:.0f} (one day), "
        "or None (Celery's own warm shutdown)",
    ),
    "cancel_on_connection_loss": _Spec(_flag, "True or False"),
    "wakeup_signal": _Spec(
        _wakeup_signal,
        "a signal whose default action is to ignore it: "
        + ", ".join(repr(sig.name) for sig in sorted(WAKEUP_SIGNALS))
        + " (the default is 'SIGURG')",
    ),
    "direct_running": _Spec(_flag, "True or False"),
}

#: The name of every setting in ``app.conf``, in the order of `Settings`' fields.
SETTINGS: Final = tuple(PREFIX + field for field in _SPECS)
_FIELDS: Final = tuple(_SPECS)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``cancellable_*`` settings of one app, validated (see :doc:`/settings`).

    Build it with `from_app`, `from_conf` or `settings_for`.  Constructing it
    directly validates the fields by the same rules and normalizes them
    (``grace=1`` becomes ``1.0``, ``wakeup_signal="winch"`` becomes
    ``signal.SIGWINCH``); it raises `SettingError` otherwise.
    """

    #: ``cancellable_ledger_url``: where cancellations are recorded; None:
    #: the app's Redis or filesystem result backend, else its Redis broker;
    #: ``"none"``: nowhere.
    ledger_url: str | None = None
    #: ``cancellable_ledger_ttl``: how long a cancellation is remembered.
    ledger_ttl: float = DEFAULT_LEDGER_TTL
    #: ``cancellable_cancel_timeout``: the longest `cancel` waits for the
    #: broker and the ledger together (see :doc:`/reliability`).
    cancel_timeout: float = DEFAULT_CANCEL_TIMEOUT
    #: ``cancellable_poll_interval``: how often a worker reads the ledger.
    poll_interval: float = DEFAULT_POLL_INTERVAL
    #: ``cancellable_grace``: seconds before a cancelled task is interrupted
    #: (None: cooperative only); ``cancel(grace=)`` and
    #: ``@cancellable(grace=)`` win over it.
    grace: float | None = None
    #: ``cancellable_kill_after``: seconds from the interrupt to the
    #: terminate step (None: never terminate).
    kill_after: float | None = DEFAULT_KILL_AFTER
    #: ``cancellable_kill_process_group``: each prefork child leads a process
    #: group, and terminate kills the whole group.
    kill_process_group: bool = False
    #: ``cancellable_cancel_siblings_on_failure``: a failed group member
    #: cancels its siblings (a task's own option wins).
    cancel_siblings_on_failure: bool = False
    #: ``cancellable_shutdown_grace``: at a warm shutdown, running
    #: ``@cancellable`` tasks are cancelled (source ``"shutdown"``) and sent
    #: back to the broker; seconds before such a task is interrupted.  None:
    #: Celery's own warm shutdown (wait for the tasks).
    shutdown_grace: float | None = None
    #: ``cancellable_cancel_on_connection_loss``: when an AMQP worker loses its
    #: broker connection, its running ``@cancellable`` ``acks_late`` tasks
    #: are cancelled (source ``"connection_lost"``): the broker redelivers them.
    cancel_on_connection_loss: bool = True
    #: ``cancellable_wakeup_signal``: the signal that wakes a prefork child.
    wakeup_signal: signal.Signals | None = DEFAULT_WAKEUP_SIGNAL
    #: ``cancellable_direct_running``: ``cancel()`` of running tasks whose
    #: STARTED state names their worker (``task_track_started``) sends the
    #: revoke to those workers only; the others learn it from the ledger.
    direct_running: bool = True

    def __post_init__(self) -> None:
        problems = []
        for field, spec in _SPECS.items():
            value = getattr(self, field)
            try:
                object.__setattr__(self, field, spec.parse(value))
            except _Invalid as exc:
                problems.append(_problem(PREFIX + field, value, spec, exc))
        if problems:
            raise SettingError(problems)

    @classmethod
    def from_app(cls, app: Any) -> Settings:
        """Read and validate the settings of a Celery app (`from_conf` with its namespace)."""
        return cls.from_conf(app.conf, namespace=getattr(app, "namespace", None))

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any], *, namespace: str | None = None) -> Settings:
        """Read and validate the ``cancellable_*`` settings of ``conf`` (an ``app.conf``).

        A setting that is absent takes its default; so does one set to None,
        except ``cancellable_grace`` and ``cancellable_kill_after``, for
        which None is a value ("cooperative only", "never terminate").

        Args:
            conf: The configuration, e.g. ``app.conf``.
            namespace: The app's namespace (``app.namespace``, set by
                ``config_from_object(..., namespace="CELERY")``), under which
                a typo such as ``CELERY_CANCELLABLE_GRAC`` is recognized as
                ours.

        Raises:
            SettingError: A value is invalid, or a key starting with
                ``cancellable_`` (in any case, or after the namespace's
                prefix) is not a setting; every problem found is in the
                message.
        """
        problems = _unknown_keys(conf, namespace)
        values: dict[str, Any] = {}
        for field, spec in _SPECS.items():
            value = conf.get(PREFIX + field, _ABSENT)
            if value is _ABSENT or (value is None and spec.none_is_default):
                continue
            try:
                values[field] = spec.parse(value)
            except _Invalid as exc:
                problems.append(_problem(PREFIX + field, value, spec, exc))
        if problems:
            raise SettingError(problems)
        return cls(**values)


_ABSENT: Final = object()


def _problem(name: str, value: object, spec: _Spec, exc: _Invalid) -> tuple[str, str]:
    why = f" ({exc})" if str(exc) else ""
    return name, f"{name}={value!r} is not valid: expected {spec.accepted}{why}"


def _unknown_keys(conf: Mapping[str, Any], namespace: str | None) -> list[tuple[str, str]]:
    # Celery finds a setting under its own name and, when the app has a
    # namespace (config_from_object(..., namespace="CELERY")), under the
    # namespace's prefix in the namespace's case ("CELERY_CANCELLABLE_GRACE").
    prefix = namespace.rstrip("_") + "_" if namespace else ""
    found = set(SETTINGS)
    if prefix:
        in_case = str.upper if prefix.isupper() else str.lower
        found |= {in_case(prefix + name) for name in SETTINGS}
    problems = []
    for key in conf:
        if not isinstance(key, str) or key in found:
            continue
        name = key[len(prefix) :] if prefix and key.upper().startswith(prefix.upper()) else key
        if not name.lower().startswith(PREFIX):
            continue
        # Compare what follows the prefix, which every setting shares.
        close = difflib.get_close_matches(name[len(PREFIX) :].lower(), _FIELDS, n=1, cutoff=0.5)
        hint = f"did you mean {PREFIX}{close[0]}?" if close else f"known: {', '.join(SETTINGS)}"
        problems.append((key, f"{key} is not a cancellable setting: {hint}"))
    return problems


#: `settings_for`'s cache: immutable values, keyed weakly by app.
_by_app: weakref.WeakKeyDictionary[Any, Settings] = weakref.WeakKeyDictionary()


def settings_for(app: Any) -> Settings:
    """The settings of ``app``, read from ``app.conf`` on the first call, then remembered.

    Later changes to ``app.conf`` are not seen: configure the app before the
    worker starts or the first cancellation.  The app is held weakly.

    Raises:
        SettingError: As `Settings.from_conf`; nothing is remembered then.
    """
    settings = _by_app.get(app)
    if settings is None:
        settings = _by_app[app] = Settings.from_app(app)
    return settings


def forget_settings(app: Any) -> None:
    """Drop what `settings_for` remembered of ``app`` (after `configure` changed it)."""
    _by_app.pop(app, None)
