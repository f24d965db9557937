"""Soak modes and the seeded plan: which tasks to send when, and what to do to them.

The plan (task kinds, arguments, ids, send times, the times and kinds of
actions) is a pure function of the mode and the seed.  Which task an action
hits is chosen at run time, by a second generator seeded from the same seed,
among the tasks that are queued, running or finished at that moment, so a
repeated run follows the same schedule but timing can change the targets.
"""

from __future__ import annotations

import dataclasses
import os
import random
import uuid
from typing import Any

from .audit import TaskRecord

ENV_MODE = "CANCELLABLE_SOAK"
ENV_SEED = "CANCELLABLE_SOAK_SEED"
ENV_MINUTES = "CANCELLABLE_SOAK_MINUTES"
ENV_DIR = "CANCELLABLE_SOAK_DIR"
ENV_GRACE = "CANCELLABLE_SOAK_GRACE"
ENV_LEDGER = "CANCELLABLE_SOAK_LEDGER"
ENV_CUTS = "CANCELLABLE_SOAK_CUTS"
#: The ledgers a soak can run against: the soak's own Redis (the default), or a
#: PostgreSQL database the soak creates for the run and drops afterwards.
LEDGERS = ("redis", "postgresql")


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    seed: int
    duration: float  # seconds over which tasks are sent and actions run
    tasks: int
    workers: int
    concurrency: int
    visibility_timeout: float
    child_kills: int
    worker_kills: int
    redis_restarts: int
    #: Warm shutdowns (SIGTERM) of a worker, whose running tasks go back to
    #: the broker (``cancellable_shutdown_grace``, docs/shutdown.md).
    warm_shutdowns: int
    groups: int
    group_size: tuple[int, int]
    cancel_fraction: float
    long_seconds: tuple[float, float]
    slow_seconds: tuple[float, float]
    hook_seconds: tuple[float, float]
    blind_seconds: tuple[float, float]
    weights: dict[str, float]
    grace: float
    drain_timeout: float
    #: Hung-server phases: how many, how long each (SIGSTOP of the soak's Redis),
    #: and how many plain revokes are sent while it is stopped.
    hangs: int = 0
    hang_seconds: tuple[float, float] = (10.0, 10.0)
    hang_revokes: int = 4
    #: Connection cuts: the TCP proxy between the workers and the soak's Redis
    #: drops every connection, refuses new ones for ``cut_refuse_seconds``
    #: (the share ``instant_cuts`` of the cuts accepts again at once instead),
    #: then accepts again.
    connection_cuts: int = 0
    cut_refuse_seconds: tuple[float, float] = (0.5, 3.0)
    #: Cuts that accept again at once: the worker closes its broken
    #: connection while Redis answers, when kombu would put its running tasks'
    #: messages back on the queue (the worker keeps them: docs/shutdown.md).
    instant_cuts: float = 1 / 3
    #: Where the workers and the client record cancellations (`LEDGERS`).
    ledger: str = "redis"

    def describe(self) -> str:
        return (
            f"mode={self.name} seed={self.seed} duration={self.duration:.0f}s tasks={self.tasks} "
            f"workers={self.workers}x{self.concurrency} child_kills={self.child_kills} "
            f"worker_kills={self.worker_kills} redis_restarts={self.redis_restarts} "
            f"hangs={self.hangs}x{self.hang_seconds[0]:.0f}-{self.hang_seconds[1]:.0f}s "
            f"warm_shutdowns={self.warm_shutdowns} connection_cuts={self.connection_cuts} "
            f"groups={self.groups}x{self.group_size} ledger={self.ledger}"
        )


def mode_from_env(env: dict[str, str] | None = None) -> Mode:
    env = dict(os.environ if env is None else env)
    name = env.get(ENV_MODE, "short").strip().lower() or "short"
    if name not in ("short", "long"):
        raise ValueError(f"{ENV_MODE} must be 'short' or 'long', not {name!r}")
    seed_text = env.get(ENV_SEED, "").strip()
    seed = int(seed_text) if seed_text else random.SystemRandom().randrange(1, 10**6)
    grace = float(env.get(ENV_GRACE, "1.0"))
    ledger = env.get(ENV_LEDGER, "redis").strip().lower() or "redis"
    if ledger not in LEDGERS:
        raise ValueError(f"{ENV_LEDGER} must be one of {', '.join(LEDGERS)}, not {ledger!r}")
    mode = _mode(name, seed, grace, ledger, env)
    cuts_text = env.get(ENV_CUTS, "").strip()
    if cuts_text:
        if not cuts_text.isdigit():
            raise ValueError(f"{ENV_CUTS} must be a whole number of cuts, not {cuts_text!r}")
        mode = dataclasses.replace(mode, connection_cuts=int(cuts_text))
    return mode


def _mode(name: str, seed: int, grace: float, ledger: str, env: dict[str, str]) -> Mode:
    if name == "short":
        return Mode(
            name="short",
            seed=seed,
            duration=30.0,
            tasks=150,
            workers=3,
            concurrency=2,
            visibility_timeout=20.0,
            child_kills=1,
            worker_kills=1,
            redis_restarts=1,
            warm_shutdowns=1,
            groups=1,
            group_size=(50, 50),
            cancel_fraction=0.3,
            long_seconds=(2.0, 4.0),
            slow_seconds=(0.5, 1.5),
            hook_seconds=(0.5, 1.0),
            blind_seconds=(1.0, 2.0),
            weights={"short": 0.55, "long": 0.15, "slow_cleanup": 0.15, "no_checkpoint": 0.15},
            grace=grace,
            drain_timeout=60.0,
            hangs=1,
            hang_seconds=(10.0, 10.0),
            hang_revokes=4,
            # Two cuts (``make test`` runs this mode), one of which may accept
            # again at once: kombu would put a running task's message back on
            # the queue as the worker closes its broken connection while Redis
            # answers, unless the worker keeps it (docs/shutdown.md).
            connection_cuts=2,
            cut_refuse_seconds=(1.0, 3.0),
            instant_cuts=0.5,
            ledger=ledger,
        )
    minutes = float(env.get(ENV_MINUTES, "8"))
    if minutes <= 0:
        raise ValueError(f"{ENV_MINUTES} must be positive")
    return Mode(
        name="long",
        seed=seed,
        duration=minutes * 60.0,
        tasks=max(1500, int(190 * minutes)),
        workers=3,
        concurrency=2,
        visibility_timeout=30.0,
        child_kills=max(8, int(minutes * 1.5)),
        worker_kills=max(3, int(minutes / 2)),
        redis_restarts=max(2, int(minutes / 3)),
        warm_shutdowns=max(2, int(minutes / 3)),
        groups=max(2, int(minutes / 2)),
        group_size=(100, 200),
        cancel_fraction=0.3,
        long_seconds=(3.0, 10.0),
        slow_seconds=(1.0, 3.0),
        hook_seconds=(0.5, 1.0),
        blind_seconds=(1.0, 3.0),
        weights={"short": 0.6, "long": 0.1, "slow_cleanup": 0.13, "no_checkpoint": 0.17},
        grace=grace,
        drain_timeout=150.0,
        hangs=max(3, int(minutes / 2)),
        hang_seconds=(10.0, 30.0),
        hang_revokes=8,
        connection_cuts=max(4, int(minutes)),
        ledger=ledger,
    )


#: The kinds of a group's members.
GROUP_WEIGHTS = {"short": 0.8, "long": 0.1, "slow_cleanup": 0.1}


@dataclasses.dataclass
class Action:
    at: float  # seconds after the schedule starts
    kind: str  # "cancel", "group", "kill_child", "kill_worker", "restart_redis", "hang_redis",
    # "warm_shutdown", "cut_connections"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Plan:
    mode: Mode
    tasks: list[TaskRecord]  # sent_at here is the offset in the schedule
    actions: list[Action]


def new_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def task_args(kind: str, mode: Mode, rng: random.Random) -> list[Any]:
    if kind == "short":
        return [rng.randint(3, 6), round(rng.uniform(0.02, 0.06), 3)]
    if kind == "long":
        return [round(rng.uniform(*mode.long_seconds), 2)]
    if kind == "slow_cleanup":
        return [
            round(rng.uniform(*mode.slow_seconds), 2),
            round(rng.uniform(*mode.hook_seconds), 2),
        ]
    return [round(rng.uniform(*mode.blind_seconds), 2)]


def make_plan(mode: Mode) -> Plan:
    rng = random.Random(mode.seed)
    kinds = list(mode.weights)
    weights = [mode.weights[k] for k in kinds]
    span = mode.duration * 0.85
    tasks: list[TaskRecord] = []
    # Sent in bursts, so that a backlog (queued tasks to cancel) builds up.
    t = 0.0
    while len(tasks) < mode.tasks:
        burst = min(mode.tasks - len(tasks), rng.randint(3, 12))
        for _ in range(burst):
            kind = rng.choices(kinds, weights)[0]
            tasks.append(TaskRecord(new_id(rng), kind, task_args(kind, mode, rng), t))
        t += rng.uniform(0.5, 2.5)
    scale = span / max(t, 1e-9)
    for task in tasks:
        task.sent_at = round(task.sent_at * scale, 3)

    actions: list[Action] = []
    # About 1.6 ids per call on average (batches of control.revoke and cancel).
    n_cancels = int(mode.tasks * mode.cancel_fraction / 1.6)
    for _ in range(n_cancels):
        method = rng.choices(["cancel", "revoke", "control"], [0.5, 0.25, 0.25])[0]
        batch = 1
        if method == "control":
            batch = rng.randint(1, 4)
        elif method == "cancel" and rng.random() < 0.2:
            batch = rng.randint(2, 5)
        phase = rng.choices(["queued", "running", "finished"], [0.4, 0.4, 0.2])[0]
        actions.append(
            Action(
                round(rng.uniform(1.0, mode.duration), 3),
                "cancel",
                {"method": method, "batch": batch, "phase": phase, "as_result": rng.random() < 0.5},
            )
        )
    for _ in range(mode.groups):
        size = rng.randint(*mode.group_size)
        # Mostly short tasks, with some long and slow-cleanup ones, so that
        # members are still running when the group is cancelled.
        members = []
        for _ in range(size):
            kind = rng.choices(list(GROUP_WEIGHTS), list(GROUP_WEIGHTS.values()))[0]
            members.append(TaskRecord(new_id(rng), kind, task_args(kind, mode, rng), 0.0))
        actions.append(
            Action(
                round(rng.uniform(0.1, 0.8) * mode.duration, 3),
                "group",
                {
                    "id": new_id(rng),
                    "members": members,
                    "cancel_after": round(rng.uniform(0.3, 2.0), 3),
                },
            )
        )
    # Faults, spread over the middle of the schedule at least a few seconds apart.
    faults = (
        ["kill_child"] * mode.child_kills
        + ["kill_worker"] * mode.worker_kills
        + ["restart_redis"] * mode.redis_restarts
        + ["hang_redis"] * mode.hangs
        + ["warm_shutdown"] * mode.warm_shutdowns
        + ["cut_connections"] * mode.connection_cuts
    )
    rng.shuffle(faults)
    lo, hi = 0.1 * mode.duration, 0.85 * mode.duration
    step = (hi - lo) / max(1, len(faults))
    for i, kind in enumerate(faults):
        at = lo + step * i + rng.uniform(0, step * 0.5)
        params: dict[str, Any] = {}
        if kind == "restart_redis":
            params["down_for"] = round(rng.uniform(1.0, 2.5), 2)
        if kind == "hang_redis":
            params["pause_for"] = round(rng.uniform(*mode.hang_seconds), 2)
            params["revokes"] = mode.hang_revokes
        if kind == "cut_connections":
            # Some accept again at once (the workers reconnect while their
            # tasks run on); the others are refused for a while first.
            refuse = rng.random() >= mode.instant_cuts
            params["refuse_for"] = (
                round(rng.uniform(*mode.cut_refuse_seconds), 2) if refuse else 0.0
            )
        actions.append(Action(round(at, 3), kind, params))
    actions.sort(key=lambda a: a.at)
    return Plan(mode, tasks, actions)
