"""``postbote events tail|replay``: read delivery events from the outbox, publish them again."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from worker.cli import webhooks
from worker.cli.output import fail
from worker.db import Connection, connect, translated_errors
from worker.errors import BrokerUnavailable, DatabaseUnavailable
from worker.logs import printable
from worker.runtime.event_publisher import EventPublisher
from worker.runtime.relay import EVENT_COLUMNS, OutboxEvent
from worker.settings import Settings
from worker.tools.dlq import parse_duration

PAGE = 1000
FOLLOW_POLL_S = 0.5
GAP_WAIT_S = 60.0
"""How long ``--follow`` waits for an event id that was skipped (its transaction had not committed
yet when a later one had) before it gives up on it (the transaction rolled back)."""
_MAX_GAPS = 10_000
_SINCE_HELP = (
    "from this event on (its event_id), or from this time on: ISO 8601 (2026-05-04T10:00+02:00,"
    " 2026-05-04; without an offset: local time) or an age (30m, 2h, 7d)"
)


def register(subparsers: Any) -> None:
    events = subparsers.add_parser(
        "events",
        help="delivery events: tail the outbox, replay events to <prefix>.events",
        description="Every change of a job's state is a delivery event, kept in the outbox table for"
        " POSTBOTE_EVENTS_RETENTION_DAYS after it was published (docs/events.md).",
    )
    commands = events.add_subparsers(dest="events_command", metavar="COMMAND", required=True)

    tail = commands.add_parser("tail", help="print delivery events, oldest first; --follow for new ones")
    tail.add_argument("--tenant", help="only this tenant's events")
    tail.add_argument("--job", metavar="ID", help="only this job's events")
    tail.add_argument("--since", metavar="EVENT_ID|TIME", help=_SINCE_HELP + " (default: the last --lines)")
    tail.add_argument(
        "-n", "--lines", type=_positive, default=20, help="without --since: the last N events (default 20)"
    )
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing events as they occur")
    tail.add_argument("--json", action="store_true", help="one JSON object per line, as published")
    tail.set_defaults(func=run_tail)

    replay = commands.add_parser(
        "replay", help="publish events again, with their original event ids, to <prefix>.events"
    )
    replay.add_argument("--since", metavar="EVENT_ID|TIME", required=True, help=_SINCE_HELP)
    replay.add_argument("--tenant", help="only this tenant's events")
    replay.add_argument(
        "--dry-run", action="store_true", help="say how many would be published, publish none"
    )
    replay.set_defaults(func=run_replay)

    webhooks.register(commands)


@dataclass(frozen=True)
class Since:
    """Where a listing starts: at an event (inclusive) or at a time (inclusive)."""

    event_id: UUID | None = None
    time: datetime | None = None


def parse_since(text: str, *, now: datetime | None = None) -> Since:
    """An event id, an ISO 8601 time (naive: local time) or an age like ``2h``; ``ValueError`` otherwise."""
    text = text.strip()
    try:
        return Since(event_id=UUID(text))
    except ValueError:
        pass
    try:
        age_ms = parse_duration(text)
    except ValueError:
        pass
    else:
        return Since(time=(now or datetime.now(UTC)) - timedelta(milliseconds=age_ms))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an event id (UUID), a time (ISO 8601) nor an age like 30m, 2h or 7d"
        ) from None
    return Since(time=moment if moment.tzinfo else moment.astimezone())


@dataclass(frozen=True)
class _Filter:
    tenant: str | None = None
    job_id: UUID | None = None
    since_time: datetime | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses, params = [], []
        for clause, value in (
            ("tenant_id = %s", self.tenant),
            ("job_id = %s", self.job_id),
            ("occurred_at >= %s", self.since_time),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        return "".join(f" AND {c}" for c in clauses), params

    def page(self, conn: Connection, *, after: int, limit: int = PAGE) -> list[OutboxEvent]:
        """The matching events with an id above ``after``, in id order."""
        where, params = self.where()
        query = f"SELECT {EVENT_COLUMNS} FROM events WHERE id > %s{where} ORDER BY id LIMIT %s"
        with translated_errors():
            rows = conn.execute(query.encode(), [after, *params, limit]).fetchall()
        return [OutboxEvent.from_row(r) for r in rows]

    def among(self, conn: Connection, ids: list[int]) -> list[OutboxEvent]:
        """The matching events among ``ids``, in id order."""
        where, params = self.where()
        query = f"SELECT {EVENT_COLUMNS} FROM events WHERE id = ANY(%s){where} ORDER BY id"
        with translated_errors():
            rows = conn.execute(query.encode(), [ids, *params]).fetchall()
        return [OutboxEvent.from_row(r) for r in rows]

    def last(self, conn: Connection, count: int) -> list[OutboxEvent]:
        where, params = self.where()
        query = f"SELECT {EVENT_COLUMNS} FROM events WHERE true{where} ORDER BY id DESC LIMIT %s"
        with translated_errors():
            rows = conn.execute(query.encode(), [*params, count]).fetchall()
        return [OutboxEvent.from_row(r) for r in reversed(rows)]

    def count(self, conn: Connection, *, after: int) -> int:
        where, params = self.where()
        query = f"SELECT count(*) AS n FROM events WHERE id > %s{where}"
        with translated_errors():
            row = conn.execute(query.encode(), [after, *params]).fetchone()
        return int(row["n"]) if row else 0

    def all(self, conn: Connection, *, after: int) -> Iterator[OutboxEvent]:
        """Every matching event above ``after``, in id order, a page at a time."""
        while page := self.page(conn, after=after):
            yield from page
            after = page[-1].id


class _Cursor:
    """Where ``--follow`` stands: the highest event id seen, and the lower ids that were missing
    then. Ids are taken when a row is inserted, not when it commits, so a row may appear below
    one already seen; a missing id is looked for again until ``GAP_WAIT_S`` has passed."""

    def __init__(self, after: int, present: list[int]) -> None:
        self.after = after
        self.gaps: dict[int, float] = {}
        self._note_missing(max(0, after - PAGE), [i for i in present if i <= after], time.monotonic())

    def advance(self, conn: Connection) -> list[int]:
        """The ids that appeared since the last call (new ones and filled gaps)."""
        with translated_errors():
            rows = conn.execute(
                "SELECT id FROM events WHERE id > %s OR id = ANY(%s) ORDER BY id LIMIT %s",
                (self.after, list(self.gaps), PAGE * 5),
            ).fetchall()
        ids = [int(r["id"]) for r in rows]
        now = time.monotonic()
        for found in ids:
            self.gaps.pop(found, None)
        fresh = [i for i in ids if i > self.after]
        if fresh:
            self._note_missing(self.after, fresh, now)
            self.after = fresh[-1]
        self.gaps = {i: t for i, t in self.gaps.items() if now - t < GAP_WAIT_S}
        return ids

    def _note_missing(self, after: int, present: list[int], now: float) -> None:
        expected = after + 1
        for found in present:
            if found - expected <= _MAX_GAPS:
                self.gaps.update(dict.fromkeys(range(expected, found), now))
            expected = found + 1


def run_tail(args: argparse.Namespace, settings: Settings) -> int:
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as e:
        return fail(str(e), code=2)
    try:
        job_id = UUID(args.job) if args.job else None
    except ValueError:
        return fail(f"{args.job!r} is not a job id (a UUID)", code=2)
    show = _show_json if args.json else _show_line
    try:
        with _connect(settings) as conn:
            found = _start(conn, since)
            if found is None:
                return _unknown_event(since, settings)
            after, since_time = found
            query = _Filter(args.tenant, job_id, since_time)
            top = _top(conn)
            if since is None:
                for event in query.last(conn, args.lines):
                    show(event)
            else:
                for event in query.all(conn, after=after):
                    if event.id > top:
                        break
                    show(event)
            sys.stdout.flush()
            if args.follow:
                _follow(conn, settings, query, top, show)
    except DatabaseUnavailable as e:
        return fail(str(e))
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, also when Python flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _follow(
    conn: Connection, settings: Settings, query: _Filter, top: int, show: Callable[[OutboxEvent], None]
) -> None:
    """Print the matching events as they appear, until interrupted; a database outage is reported
    once and outlasted."""
    with translated_errors():
        rows = conn.execute("SELECT id FROM events WHERE id > %s AND id <= %s", (max(0, top - PAGE), top))
        cursor = _Cursor(top, [int(r["id"]) for r in rows])
    outage: str | None = None
    while True:
        try:
            if conn.closed:
                conn = _connect(settings)
            ids = cursor.advance(conn)
            events = query.among(conn, ids) if ids else []
        except DatabaseUnavailable as e:
            if outage is None:
                fail(f"{e}; retrying")
            outage = str(e)
            conn.close()
            time.sleep(FOLLOW_POLL_S * 4)
            continue
        outage = None
        for event in events:
            show(event)
        sys.stdout.flush()
        if len(ids) < PAGE * 5:
            time.sleep(FOLLOW_POLL_S)


def run_replay(args: argparse.Namespace, settings: Settings) -> int:
    try:
        since = parse_since(args.since)
    except ValueError as e:
        return fail(str(e), code=2)
    publisher = EventPublisher(settings.broker_url, settings.queue_prefix)
    published = 0
    try:
        with _connect(settings) as conn, publisher:
            found = _start(conn, since)
            if found is None:
                return _unknown_event(since, settings)
            after, since_time = found
            query = _Filter(args.tenant, None, since_time)
            if args.dry_run:
                count = query.count(conn, after=after)
                print(f"would replay {count} event(s) to {publisher.exchange}")
                return 0
            for event in query.all(conn, after=after):
                if publisher.publish([(event.routing_key, event.encode(), event.properties())]) != 1:
                    raise BrokerUnavailable(f"RabbitMQ did not confirm event {event.event_id} in time")
                published += 1
    except (DatabaseUnavailable, BrokerUnavailable) as e:
        if published:
            print(f"replayed {published} event(s) to {publisher.exchange} before the failure")
        return fail(str(e))
    print(f"replayed {published} event(s) to {publisher.exchange}")
    return 0


def _top(conn: Connection) -> int:
    """The highest event id now."""
    with translated_errors():
        row = conn.execute("SELECT coalesce(max(id), 0) AS top FROM events").fetchone()
    return int(row["top"]) if row else 0


def _start(conn: Connection, since: Since | None) -> tuple[int, datetime | None] | None:
    """The id to list events after and the time to list them from; ``None`` for an unknown event."""
    if since is None:
        return 0, None
    if since.time is not None:
        with translated_errors():
            row = conn.execute(
                "SELECT min(id) AS first FROM events WHERE occurred_at >= %s", (since.time,)
            ).fetchone()
        first = row["first"] if row else None
        return (int(first) - 1 if first is not None else _top(conn)), since.time
    with translated_errors():
        row = conn.execute("SELECT id FROM events WHERE event_id = %s", (since.event_id,)).fetchone()
    return None if row is None else (int(row["id"]) - 1, None)


def _unknown_event(since: Since | None, settings: Settings) -> int:
    return fail(
        f"no event {since.event_id if since else ''} in the outbox: unknown, or published more than"
        f" POSTBOTE_EVENTS_RETENTION_DAYS ({settings.events_retention_days}) days ago and deleted"
    )


def _show_line(event: OutboxEvent) -> None:
    body = event.body
    document = body.get("document") or {}
    cells = (
        event.occurred_at.astimezone().isoformat(timespec="seconds"),
        event.tenant,
        f"{document.get('type', event.doc_type)} {document.get('number', '?')}",
        event.type,
        body.get("status") or "-",
        body.get("reason") or "-",
    )
    print("  ".join(printable(cell) for cell in cells))


def _show_json(event: OutboxEvent) -> None:
    print(json.dumps(event.document(), ensure_ascii=False))


def _connect(settings: Settings) -> Connection:
    return connect(settings.database_url, autocommit=True, statement_timeout_ms=settings.statement_timeout_ms)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number
