"""The ``cancellable_*`` settings: defaults, good values, every bad value, unknown keys.

Every test reads the configuration of a real ``celery.Celery`` app.
"""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import gc
import math
import signal
import weakref
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import ImproperlyConfigured
from hypothesis import given
from hypothesis import strategies as st

from cancellable.celery._settings import (
    DEFAULT_KILL_AFTER,
    DEFAULT_LEDGER_TTL,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_WAKEUP_SIGNAL,
    MAX_GRACE,
    SETTINGS,
    SettingError,
    Settings,
    settings_for,
)


def make_app(**settings: Any) -> Celery:
    """A real Celery app (not the current app) with ``settings`` in its configuration."""
    app = Celery("settings-test", broker="memory://", set_as_current=False)
    app.conf.update(settings)
    return app


def read(**settings: Any) -> Settings:
    """The settings of a new app configured with ``settings``."""
    return Settings.from_conf(make_app(**settings).conf)


def refused(**settings: Any) -> SettingError:
    """The error reading an app configured with ``settings`` raises."""
    with pytest.raises(SettingError) as caught:
        read(**settings)
    return caught.value


class TestDefaults:
    def test_an_app_without_settings_gets_every_default(self):
        """An app that sets nothing gets the documented defaults."""
        settings = read()

        assert None is settings.ledger_url
        assert 7 * 24 * 3600.0 == settings.ledger_ttl == DEFAULT_LEDGER_TTL
        assert 2.0 == settings.poll_interval == DEFAULT_POLL_INTERVAL
        assert None is settings.grace
        assert 10.0 == settings.kill_after == DEFAULT_KILL_AFTER
        assert False is settings.kill_process_group
        assert False is settings.cancel_siblings_on_failure
        assert True is settings.direct_running
        assert None is settings.shutdown_grace
        assert True is settings.cancel_on_connection_loss
        assert getattr(signal.Signals, "SIGURG", None) == settings.wakeup_signal
        assert DEFAULT_WAKEUP_SIGNAL == settings.wakeup_signal
        assert Settings() == settings

    @pytest.mark.parametrize(
        "name",
        [
            "cancellable_ledger_url",
            "cancellable_ledger_ttl",
            "cancellable_poll_interval",
            "cancellable_kill_process_group",
            "cancellable_cancel_siblings_on_failure",
            "cancellable_shutdown_grace",
            "cancellable_cancel_on_connection_loss",
            "cancellable_wakeup_signal",
        ],
    )
    def test_none_means_the_default(self, name):
        """A setting set to None takes its default, except grace and kill_after."""
        assert Settings() == read(**{name: None})

    def test_none_is_a_value_for_grace_and_kill_after(self):
        """``cancellable_kill_after=None`` means never terminate; grace None: cooperative."""
        settings = read(cancellable_grace=None, cancellable_kill_after=None)

        assert None is settings.grace
        assert None is settings.kill_after

    def test_an_empty_ledger_url_means_the_default(self):
        """``cancellable_ledger_url=""`` (the old default) chooses the backend or broker."""
        assert None is read(cancellable_ledger_url="").ledger_url

    def test_every_setting_has_a_field(self):
        """`SETTINGS` names one field of `Settings` each, in order."""
        fields = [f"cancellable_{name}" for name in Settings.__dataclass_fields__]

        assert fields == list(SETTINGS)


class TestGoodValues:
    @pytest.mark.parametrize(
        ("name", "value", "field", "expected"),
        [
            ("cancellable_ledger_url", "redis://127.0.0.1:6379/3", "ledger_url", None),
            ("cancellable_ledger_url", "rediss://user:pw@host:6380/0", "ledger_url", None),
            ("cancellable_ledger_url", "unix:///run/redis.sock?db=2", "ledger_url", None),
            ("cancellable_ledger_url", "file:///var/lib/ledger", "ledger_url", None),
            ("cancellable_ledger_url", "file://localhost/var/lib/ledger", "ledger_url", None),
            ("cancellable_ledger_url", "none", "ledger_url", "none"),
            ("cancellable_ledger_url", "NONE", "ledger_url", "none"),
            ("cancellable_ledger_ttl", 60, "ledger_ttl", 60.0),
            ("cancellable_ledger_ttl", 0.5, "ledger_ttl", 0.5),
            ("cancellable_poll_interval", 1, "poll_interval", 1.0),
            ("cancellable_poll_interval", 0.01, "poll_interval", 0.01),
            ("cancellable_grace", 0, "grace", 0.0),
            ("cancellable_grace", 2.5, "grace", 2.5),
            ("cancellable_kill_after", 0, "kill_after", 0.0),
            ("cancellable_kill_after", 30, "kill_after", 30.0),
            ("cancellable_kill_process_group", True, "kill_process_group", True),
            ("cancellable_kill_process_group", False, "kill_process_group", False),
            ("cancellable_cancel_siblings_on_failure", True, "cancel_siblings_on_failure", True),
            ("cancellable_shutdown_grace", 0, "shutdown_grace", 0.0),
            ("cancellable_shutdown_grace", 3, "shutdown_grace", 3.0),
            ("cancellable_cancel_on_connection_loss", False, "cancel_on_connection_loss", False),
            ("cancellable_wakeup_signal", "SIGWINCH", "wakeup_signal", signal.SIGWINCH),
            ("cancellable_wakeup_signal", "winch", "wakeup_signal", signal.SIGWINCH),
            ("cancellable_wakeup_signal", int(signal.SIGWINCH), "wakeup_signal", signal.SIGWINCH),
            ("cancellable_wakeup_signal", signal.SIGURG, "wakeup_signal", signal.SIGURG),
        ],
    )
    def test_a_good_value_is_read_and_normalized(self, name, value, field, expected):
        """A valid value is accepted, as the field's type (None: kept as given)."""
        got = getattr(read(**{name: value}), field)

        assert (value if expected is None else expected) == got
        assert type(value if expected is None else expected) is type(got)

    def test_integers_become_floats(self):
        """Seconds given as ints are floats in the settings."""
        settings = read(cancellable_ledger_ttl=60, cancellable_grace=1, cancellable_kill_after=2)

        assert (float, float, float) == tuple(
            type(value) for value in (settings.ledger_ttl, settings.grace, settings.kill_after)
        )

    def test_a_namespaced_setting_is_read(self):
        """With ``config_from_object(..., namespace="CELERY")`` (Django), the
        setting is read under ``CELERY_CANCELLABLE_...`` as Celery reads its own."""

        class Config:
            CELERY_CANCELLABLE_GRACE = 2.5
            CELERY_CANCELLABLE_LEDGER_URL = "none"

        app = Celery("settings-test", set_as_current=False)
        app.config_from_object(Config, namespace="CELERY")

        settings = Settings.from_app(app)

        assert (2.5, "none") == (settings.grace, settings.ledger_url)

    def test_settings_are_frozen(self):
        """The settings object cannot be changed after it is built."""
        settings = read(cancellable_grace=1.0)

        with pytest.raises(AttributeError):
            settings.grace = 2.0  # type: ignore[misc]


#: (setting, bad value, words the message must contain).
BAD_VALUES = [
    ("cancellable_ledger_url", "http://example.invalid/", "redis://"),
    ("cancellable_ledger_url", "REDIS://host/0", "redis://"),
    ("cancellable_ledger_url", "redis:/host", "redis://"),
    ("cancellable_ledger_url", "redis://host:port/0", "redis://"),
    ("cancellable_ledger_url", "file://relative/path", "file:///absolute/path"),
    # Issue 18, point 10: "dir" is not silently dropped (a URL parser would
    # take it for a host name, Celery's filesystem backend for a relative path).
    ("cancellable_ledger_url", "file://dir", "'dir' as a host name"),
    ("cancellable_ledger_url", "file://dir/ledger", "(three slashes)"),
    ("cancellable_ledger_url", "file://", "file:///absolute/path"),
    ("cancellable_ledger_url", "unix://", "unix://"),
    ("cancellable_ledger_url", "/var/lib/ledger", "file:///absolute/path"),
    ("cancellable_ledger_url", 6379, "redis://"),
    ("cancellable_ledger_url", b"redis://host/0", "redis://"),
    ("cancellable_ledger_url", False, "redis://"),
    ("cancellable_ledger_ttl", "7d", "a positive number of seconds"),
    ("cancellable_ledger_ttl", "60", "a positive number of seconds"),
    ("cancellable_ledger_ttl", 0, "a positive number of seconds"),
    ("cancellable_ledger_ttl", -1, "a positive number of seconds"),
    ("cancellable_ledger_ttl", math.inf, "a positive number of seconds"),
    ("cancellable_ledger_ttl", math.nan, "a positive number of seconds"),
    ("cancellable_ledger_ttl", True, "a positive number of seconds"),
    ("cancellable_ledger_ttl", 10**400, "a positive number of seconds"),
    ("cancellable_poll_interval", "2s", "a positive number of seconds"),
    ("cancellable_poll_interval", 0, "a positive number of seconds"),
    ("cancellable_poll_interval", 0.0, "a positive number of seconds"),
    ("cancellable_poll_interval", -0.5, "a positive number of seconds"),
    ("cancellable_poll_interval", math.inf, "a positive number of seconds"),
    ("cancellable_poll_interval", math.nan, "a positive number of seconds"),
    ("cancellable_poll_interval", False, "a positive number of seconds"),
    ("cancellable_poll_interval", [2], "a positive number of seconds"),
    ("cancellable_grace", "default", "a number of seconds from 0 to 86400 (one day), or None"),
    ("cancellable_grace", "5", "a number of seconds from 0 to 86400 (one day), or None"),
    ("cancellable_grace", -1, "a number of seconds from 0 to 86400 (one day), or None"),
    ("cancellable_grace", math.inf, "a number of seconds from 0 to 86400 (one day), or None"),
    ("cancellable_grace", -math.inf, "a number of seconds from 0 to 86400 (one day), or None"),
    ("cancellable_grace", math.nan, "a number of seconds from 0 to 86400 (one day), or None"),
    ("cancellable_grace", True, "a number of seconds from 0 to 86400 (one day), or None"),
    # Above the maximum: a grace that long would pin a cancelled task.
    ("cancellable_grace", 86_400.5, "from 0 to 86400 (one day)"),
    ("cancellable_grace", 1e12, "from 0 to 86400 (one day)"),
    ("cancellable_cancel_timeout", 0, "a positive number of seconds"),
    ("cancellable_cancel_timeout", -1, "a positive number of seconds"),
    ("cancellable_cancel_timeout", math.inf, "a positive number of seconds"),
    ("cancellable_cancel_timeout", "6", "a positive number of seconds"),
    ("cancellable_kill_after", "10", "a number of seconds >= 0, or None"),
    ("cancellable_kill_after", -0.1, "a number of seconds >= 0, or None"),
    ("cancellable_kill_after", math.inf, "a number of seconds >= 0, or None"),
    ("cancellable_kill_after", math.nan, "a number of seconds >= 0, or None"),
    ("cancellable_kill_after", False, "a number of seconds >= 0, or None"),
    ("cancellable_kill_process_group", "yes", "True or False"),
    ("cancellable_kill_process_group", "false", "True or False"),
    ("cancellable_kill_process_group", 1, "True or False"),
    ("cancellable_kill_process_group", 0, "True or False"),
    ("cancellable_cancel_siblings_on_failure", "true", "True or False"),
    ("cancellable_cancel_siblings_on_failure", 1, "True or False"),
    ("cancellable_cancel_siblings_on_failure", [], "True or False"),
    ("cancellable_direct_running", "no", "True or False"),
    ("cancellable_direct_running", 0, "True or False"),
    ("cancellable_shutdown_grace", "3", "a number of seconds from 0 to 86400 (one day), or None"),
    ("cancellable_shutdown_grace", -1, "a number of seconds from 0 to 86400 (one day), or None"),
    ("cancellable_shutdown_grace", math.inf, "from 0 to 86400 (one day)"),
    ("cancellable_shutdown_grace", 86_400.5, "from 0 to 86400 (one day)"),
    ("cancellable_shutdown_grace", True, "from 0 to 86400 (one day)"),
    ("cancellable_cancel_on_connection_loss", "yes", "True or False"),
    ("cancellable_cancel_on_connection_loss", 0, "True or False"),
    ("cancellable_wakeup_signal", "SIGNOPE", "default action is to ignore it"),
    ("cancellable_wakeup_signal", "", "default action is to ignore it"),
    ("cancellable_wakeup_signal", 0, "default action is to ignore it"),
    ("cancellable_wakeup_signal", 999, "default action is to ignore it"),
    ("cancellable_wakeup_signal", 100_000, "default action is to ignore it"),
    ("cancellable_wakeup_signal", True, "default action is to ignore it"),
    ("cancellable_wakeup_signal", 10.0, "default action is to ignore it"),
    # Issue 18, point 10: a signal whose default action kills (or stops) a
    # child that has not installed the handler yet.
    ("cancellable_wakeup_signal", int(signal.SIGRTMIN), "SIGRTMIN's default action"),
    ("cancellable_wakeup_signal", "SIGRTMIN", "SIGRTMIN's default action"),
    ("cancellable_wakeup_signal", "SIGIO", "SIGIO's default action"),
    ("cancellable_wakeup_signal", "SIGPWR", "SIGPWR's default action"),
    ("cancellable_wakeup_signal", "SIGTSTP", "SIGTSTP's default action"),
    ("cancellable_wakeup_signal", "SIGSEGV", "SIGSEGV's default action"),
    # Ignored by default, but sent by the system on its own.
    ("cancellable_wakeup_signal", "SIGCHLD", "sent by the system on its own"),
    ("cancellable_wakeup_signal", "SIGCONT", "sent by the system on its own"),
    # Taken by billiard in pool children, or uncatchable.
    ("cancellable_wakeup_signal", "SIGUSR1", "default action is to ignore it"),
    ("cancellable_wakeup_signal", "usr2", "default action is to ignore it"),
    ("cancellable_wakeup_signal", "SIGTERM", "default action is to ignore it"),
    ("cancellable_wakeup_signal", "SIGHUP", "default action is to ignore it"),
    ("cancellable_wakeup_signal", "SIGINT", "default action is to ignore it"),
    ("cancellable_wakeup_signal", int(signal.SIGKILL), "default action is to ignore it"),
    ("cancellable_wakeup_signal", signal.SIGSTOP, "default action is to ignore it"),
]


class TestBadValues:
    @pytest.mark.parametrize(("name", "value", "accepted"), BAD_VALUES)
    def test_a_bad_value_is_refused_with_a_message_naming_it(self, name, value, accepted):
        """Each bad value of each setting raises `SettingError` whose message is
        ``<setting>=<repr(value)> is not valid: expected <what is accepted>``."""
        error = refused(**{name: value})

        assert f"{name}={value!r} is not valid: expected " in str(error)
        assert accepted in str(error)
        assert (name,) == error.settings

    def test_every_setting_has_a_bad_value_above(self):
        """The table of bad values covers every setting."""
        assert set(SETTINGS) == {name for name, _, _ in BAD_VALUES}

    def test_the_message_of_the_issue(self):
        """The example of issue 17, word for word."""
        error = refused(cancellable_ledger_ttl="7d")

        expected = "cancellable_ledger_ttl='7d' is not valid: expected a positive number of seconds"

        assert expected == str(error)

    def test_it_is_a_celery_configuration_error_and_a_value_error(self):
        """Celery reports it as ``ImproperlyConfigured``; ``except ValueError`` catches it too."""
        error = refused(cancellable_grace=-1)

        assert isinstance(error, ImproperlyConfigured)
        assert isinstance(error, ValueError)

    def test_every_problem_is_reported_at_once(self):
        """Several bad settings: one error, one line each, in the order of the settings."""
        error = refused(cancellable_poll_interval=0, cancellable_ledger_ttl="7d")

        assert ("cancellable_ledger_ttl", "cancellable_poll_interval") == error.settings
        assert [
            "cancellable_ledger_ttl='7d' is not valid: expected a positive number of seconds",
            "cancellable_poll_interval=0 is not valid: expected a positive number of seconds",
        ] == str(error).splitlines()

    @pytest.mark.parametrize(
        ("field", "value"),
        [("ledger_ttl", 0), ("grace", -1), ("kill_process_group", 1), ("wakeup_signal", "USR1")],
    )
    def test_building_settings_directly_checks_the_same_rules(self, field, value):
        """``Settings(...)`` refuses what `Settings.from_conf` refuses, naming the setting."""
        with pytest.raises(SettingError, match=f"^cancellable_{field}="):
            Settings(**{field: value})


class TestUnknownKeys:
    @pytest.mark.parametrize(
        ("key", "suggestion"),
        [
            ("cancellable_grace_period", "cancellable_grace"),
            ("cancellable_ledger_tll", "cancellable_ledger_ttl"),
            ("cancellable_signal", "cancellable_wakeup_signal"),
            ("CANCELLABLE_GRACE", "cancellable_grace"),
        ],
    )
    def test_a_typo_is_refused_with_the_closest_name(self, key, suggestion):
        """A ``cancellable_*`` key that is not a setting is an error that suggests the
        closest setting (upper case is a typo too: Celery reads these in lower case)."""
        error = refused(**{key: 1.0})

        assert f"{key} is not a cancellable setting: did you mean {suggestion}?" == str(error)
        assert (key,) == error.settings

    def test_a_name_close_to_nothing_lists_the_settings(self):
        """With no close setting, the message lists them all."""
        error = refused(cancellable_xyzzy=1)

        assert str(error).startswith("cancellable_xyzzy is not a cancellable setting: known: ")
        assert all(name in str(error) for name in SETTINGS)

    def test_a_typo_under_a_namespace_is_refused(self):
        """Under a namespace, ``CELERY_CANCELLABLE_GRAC`` is reported as written."""

        class Config:
            CELERY_CANCELLABLE_GRAC = 2.5

        app = Celery("settings-test", set_as_current=False)
        app.config_from_object(Config, namespace="CELERY")

        with pytest.raises(SettingError) as caught:
            Settings.from_app(app)

        assert "CELERY_CANCELLABLE_GRAC is not a cancellable setting: did you mean " + (
            "cancellable_grace?"
        ) == str(caught.value)

    def test_other_keys_are_left_alone(self):
        """Celery's own settings and other libraries' keys are not ours to judge."""
        settings = read(task_acks_late=True, my_cancellable_thing=1, flower_port=5555)

        assert Settings() == settings


class TestSettingsFor:
    def test_read_once_per_app(self):
        """`settings_for` reads ``app.conf`` once; later changes are not seen."""
        app = make_app(cancellable_grace=1.0)
        first = settings_for(app)
        app.conf.cancellable_grace = 2.0

        assert first is settings_for(app)
        assert 1.0 == settings_for(app).grace

    def test_each_app_has_its_own(self):
        """Two apps, two settings."""
        one, two = make_app(cancellable_grace=1.0), make_app(cancellable_grace=2.0)

        assert (1.0, 2.0) == (settings_for(one).grace, settings_for(two).grace)

    def test_a_bad_app_raises_every_time(self):
        """An invalid configuration is not remembered: each call raises."""
        app = make_app(cancellable_poll_interval=-1)

        for _ in range(2):
            with pytest.raises(SettingError, match="cancellable_poll_interval=-1"):
                settings_for(app)

    def test_the_app_is_not_kept_alive(self):
        """The cache holds apps weakly: a dropped app is collected."""
        app = make_app()
        settings_for(app)
        ref = weakref.ref(app)
        del app
        gc.collect()

        assert None is ref()


class TestSecondsProperties:
    @given(st.floats(min_value=0, exclude_min=True, allow_infinity=False, allow_nan=False))
    def test_any_positive_finite_float_is_a_valid_ttl_and_interval(self, seconds):
        """Every positive finite float is accepted where positive seconds are asked."""
        settings = read(cancellable_ledger_ttl=seconds, cancellable_poll_interval=seconds)

        assert (seconds, seconds) == (settings.ledger_ttl, settings.poll_interval)

    @given(
        st.one_of(
            st.floats(max_value=0),
            st.just(math.inf),
            st.just(math.nan),
            st.integers(max_value=0),
        )
    )
    def test_no_non_positive_infinite_or_nan_value_is_a_valid_ttl(self, seconds):
        """Zero, negatives, infinities and NaN are refused where positive seconds are asked."""
        with pytest.raises(SettingError, match=r"^cancellable_ledger_ttl="):
            read(cancellable_ledger_ttl=seconds)

    @given(st.floats(min_value=0, max_value=MAX_GRACE, allow_infinity=False, allow_nan=False))
    def test_any_float_from_zero_to_the_maximum_is_a_valid_grace(self, seconds):
        """Zero and `MAX_GRACE` included, every float between is a grace and a kill delay."""
        settings = read(cancellable_grace=seconds, cancellable_kill_after=seconds)

        assert (seconds, seconds) == (settings.grace, settings.kill_after)

    @given(st.floats(min_value=MAX_GRACE, exclude_min=True, allow_infinity=False))
    def test_graces_above_the_maximum_are_refused(self, seconds):
        """Issue 18, point 11: a grace above one day is refused (``grace=1e12``
        pinned a task); a kill delay that long is still accepted."""
        with pytest.raises(SettingError, match=r"^cancellable_grace="):
            read(cancellable_grace=seconds)
        assert seconds == read(cancellable_kill_after=seconds).kill_after

    @given(st.one_of(st.floats(max_value=0, exclude_max=True), st.just(math.inf)))
    def test_negative_and_infinite_graces_are_refused(self, seconds):
        """A negative or infinite grace is refused (None, not infinity, means none)."""
        with pytest.raises(SettingError, match=r"^cancellable_grace="):
            read(cancellable_grace=seconds)
