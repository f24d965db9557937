"""What the soak's Redis did to the task queue, read back from its append-only file.

kombu's Redis transport takes a message off the queue with ``BRPOP`` (the
AOF records it as ``RPOP``) and only then, in a second round trip, records it
as unacknowledged (``ZADD unacked_index`` and ``HSET unacked`` with the
message's delivery tag).  A worker that stops in between (``kill -9``, an
exit on its own, Redis going away) loses the message: it is in neither the
queue nor the unacknowledged set, so the visibility timeout never brings it
back, and no part of Celery (nor the library) ever saw it
(celery/celery#7950 and #4354, celery/kombu#305).

The soak's Redis runs with ``appendfsync always`` and without automatic
rewrites (`harness.RedisServer`), so its AOF holds every write of the run in
order, including every pop a client may have received.  `unrecorded_pops`
replays the pushes and pops of the task queue and returns the messages that
were popped and never recorded as unacknowledged, with the times of the
nearest recorded deliveries around the pop (the ``ZADD unacked_index``
scores: the workers' wall clock, the soak's clock).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections import deque
from pathlib import Path

__all__ = ["Pop", "read_commands", "unrecorded_pops"]


@dataclasses.dataclass(frozen=True)
class Pop:
    """A message taken off the queue and never recorded as unacknowledged."""

    task_id: str
    delivery_tag: str
    #: The latest delivery recorded before the pop, and the first one after
    #: (None: there was none).  The pop happened between the two.
    after: float | None
    before: float | None


def _parse(data: bytes) -> list[list[bytes]]:
    """The commands in RESP ``data`` (``#TS:`` annotations and a cut-off tail skipped)."""
    commands: list[list[bytes]] = []
    i = 0
    while i < len(data):
        if data[i : i + 1] != b"*":
            end = data.find(b"\n", i)
            if end < 0:
                break
            i = end + 1
            continue
        try:
            end = data.index(b"\r\n", i)
            count = int(data[i + 1 : end])
            i = end + 2
            args = []
            for _ in range(count):
                end = data.index(b"\r\n", i)
                length = int(data[i + 1 : end])
                i = end + 2
                if i + length + 2 > len(data):
                    raise ValueError("cut off")
                args.append(data[i : i + length])
                i += length + 2
        except ValueError:
            break  # the server is writing the last command right now
        commands.append(args)
    return commands


def read_commands(redis_dir: Path) -> list[list[bytes]] | None:
    """Every command in the AOF under ``redis_dir``, oldest first; None if unreadable.

    Redis 7 keeps a manifest and ``*.incr.aof`` files in ``appendonlydir``
    (the base file is the empty start-up snapshot as long as no rewrite ran);
    older Redis writes one ``appendonly.aof``.
    """
    folder = redis_dir / "appendonlydir"
    try:
        if folder.is_dir():
            manifest = (folder / "appendonly.aof.manifest").read_text().split("\n")
            incr = []
            for line in manifest:
                words = line.split()
                fields = dict(zip(words[::2], words[1::2], strict=False))
                if fields.get("type") == "h":
                    continue  # history: a file a rewrite has replaced
                if fields.get("type") == "b" and fields["file"].endswith(".aof"):
                    return None  # a rewrite ran: the history before it is gone
                if fields.get("type") == "i":
                    incr.append((int(fields["seq"]), fields["file"]))
            data = b"".join((folder / name).read_bytes() for _seq, name in sorted(incr))
        else:
            data = (redis_dir / "appendonly.aof").read_bytes()
    except (OSError, KeyError, ValueError):
        return None
    return _parse(data)


def _is_queue(key: bytes, queue: bytes) -> bool:
    # kombu's priority queues are "<queue>\x06\x16<priority>".
    return key == queue or key.startswith(queue + b"\x06\x16")


def unrecorded_pops(commands: list[list[bytes]], queue: str) -> dict[str, Pop] | None:
    """The messages of ``queue`` popped and never recorded as unacknowledged, by task id.

    None if the replay is inconsistent (a pop from a list it believes
    empty): then the AOF does not hold the whole history, and it proves nothing.
    """
    name = queue.encode()
    lists: dict[bytes, deque[bytes]] = {}
    recorded: set[bytes] = set()
    popped: list[tuple[int, bytes]] = []  # (index of the RPOP, message)
    times: list[tuple[int, float]] = []  # (index, score) of each ZADD unacked_index
    for index, args in enumerate(commands):
        command = args[0].upper()
        if command in (b"LPUSH", b"RPUSH") and _is_queue(args[1], name):
            items = lists.setdefault(args[1], deque())
            for value in args[2:]:
                (items.appendleft if command == b"LPUSH" else items.append)(value)
        elif command == b"RPOP" and _is_queue(args[1], name):
            items = lists.get(args[1], deque())
            count = int(args[2]) if len(args) > 2 else 1
            for _ in range(count):
                if not items:
                    return None
                popped.append((index, items.pop()))
        elif command in (b"DEL", b"UNLINK", b"LTRIM", b"LREM", b"LPOP") and _is_queue(
            args[1], name
        ):
            return None  # nothing in the soak does this: the replay cannot follow it
        elif command == b"HSET" and args[1] == b"unacked":
            recorded.update(args[2::2])
        elif command == b"ZADD" and args[1] == b"unacked_index":
            scores = [arg for arg in args[2:] if arg.upper() not in (b"NX", b"XX", b"GT", b"LT")]
            times.append((index, float(scores[0])))
    found: dict[str, Pop] = {}
    positions = [i for i, _score in times]
    for index, raw in popped:
        message = json.loads(raw)
        tag = str(message["properties"]["delivery_tag"])
        if tag.encode() in recorded:
            continue
        at = bisect.bisect(positions, index)
        after = times[at - 1][1] if at > 0 else None
        before = times[at][1] if at < len(times) else None
        task_id = str(message["headers"]["id"])
        found[task_id] = Pop(task_id, tag, after, before)
    return found
