"""Change the type of an installation's queues in place, without losing a message
(``postbote queues migrate --to quorum``).

RabbitMQ cannot change the type of a queue: it has to be deleted and declared anew. A message a
publisher sends while its queue is being deleted can be confirmed and dropped (RabbitMQ confirms
what was routed to a queue that was deleted before the message reached it), and the default
exchange cannot be unbound from a queue. So nothing may publish to postbote's queues during the
migration, and nothing may consume from them:

1. queues with consumers (workers still running) are refused;
2. every queue to migrate is watched for ``quiet_s`` seconds: a message arriving in one means a
   publisher is still sending, and the migration is refused before anything changed.

Then, for each queue of each lane (the work queue, ``.DQ`` and ``.XQ``) that is not of the
target type yet:

3. its messages move into a temporary queue ``<name>.migrating`` of the target type, each one
   acknowledged only after the broker confirmed its copy;
4. the queue is deleted only if it is empty (``if_empty``): a message published since step 2
   makes RabbitMQ refuse, the messages move back and the migration is refused;
5. it is declared with the target type's arguments (``producer.queues``);
6. the messages move back, and the temporary queue is deleted.

A message moves with its properties; one published by another RabbitMQ user (``user_id``) moves
only for a user with RabbitMQ's ``impersonator`` tag, else the migration stops with that message
still in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from producer.queues import QueueType, broker_parameters, lane_declarations
from schemas.constants import lane_queues

MIGRATING_SUFFIX = ".migrating"
QUIET_S = 3.0
"""How long the queues must receive nothing before the migration starts."""
_QUIET_POLL_S = 0.25


_PUBLISHERS = (
    "stop every publisher (the ERP's senders, `postbote send`) for the migration: RabbitMQ may confirm a "
    "message sent to a queue while it is deleted, and drop it"
)


class MigrationRefused(Exception):
    """The migration cannot start or go on; nothing was lost (the text says what to do)."""


@dataclass
class QueueReport:
    """One queue: its type before (``None``: it did not exist), its messages then, and what was done."""

    name: str
    was: str | None
    messages: int
    action: str
    moved: int = 0

    def line(self) -> str:
        state = "missing" if self.was is None else f"{self.was}, {self.messages} message(s)"
        return f"{self.name}: {state}: {self.action}"


def migrate_queues(
    broker_url: str,
    queue_prefix: str,
    to: QueueType,
    *,
    dry_run: bool = False,
    quiet_s: float = QUIET_S,
    progress: Callable[[str], None] | None = None,
) -> list[QueueReport]:
    """Bring every queue of both lanes under ``queue_prefix`` to type ``to``; returns a report per queue.

    With ``dry_run`` nothing changes: the report says what would be done.

    Raises:
      MigrationRefused: a queue has consumers (workers still running), a message arrived (a
        publisher still sending), or a message could not be moved; what was moved so far is in
        place, nothing is lost.
      pika.exceptions.AMQPError, OSError: the broker is unreachable.
    """
    connection = pika.BlockingConnection(broker_parameters(broker_url))
    try:
        session = _Session(connection)
        plans = [
            (name, arguments)
            for lane in lane_queues(queue_prefix)
            for name, arguments in lane_declarations(lane, to)
        ]
        reports = [session.inspect(name, arguments, to) for name, arguments in plans]
        busy = [f"{r.name} ({c})" for r, c in zip(reports, session.consumers, strict=True) if c]
        if busy:
            raise MigrationRefused(
                f"queues with consumers: {', '.join(busy)}; stop the workers first (a running worker "
                "declares its queue again with its own type)"
            )
        if dry_run:
            return reports
        changing = [r.name for r in reports if r.was not in (None, to)]
        if changing:
            if progress:
                progress(
                    f"watching {len(changing)} queue(s) for {quiet_s:g} s: nothing may publish to them now"
                )
            session.await_quiet(changing, quiet_s)
        for report, (name, arguments) in zip(reports, plans, strict=True):
            if report.was not in (None, to):
                report.moved = session.migrate(name, arguments, to)
                report.action = f"now {to}; {report.moved} message(s) moved and back"
            elif report.was is None:
                session.declare(name, arguments)
                report.action = f"declared as {to}"
            if progress:
                progress(report.line())
        return reports
    finally:
        if connection.is_open:
            connection.close()


class _Session:
    def __init__(self, connection: BlockingConnection) -> None:
        self.connection = connection
        self.channel = self._fresh()
        self.consumers: list[int] = []

    def _fresh(self) -> BlockingChannel:
        channel = self.connection.channel()
        channel.confirm_delivery()
        return channel

    def _unless_precondition_failed(self, action: Callable[[], object]) -> bool:
        """Run ``action``; False when RabbitMQ refused it with 406 PRECONDITION_FAILED (the channel
        it closed is replaced)."""
        try:
            action()
            return True
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code != 406:
                raise
            self.channel = self._fresh()
            return False

    def _declare_or_refused(self, name: str, arguments: dict[str, Any]) -> bool:
        """Declare ``name`` with ``arguments``; False when it exists with others."""
        return self._unless_precondition_failed(
            lambda: self.channel.queue_declare(name, durable=True, arguments=arguments)
        )

    def _counts(self, name: str) -> tuple[int, int] | None:
        """(messages, consumers) of ``name``, ``None`` when it does not exist."""
        try:
            frame = self.channel.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code != 404:
                raise
            self.channel = self._fresh()
            return None
        return int(frame.method.message_count), int(frame.method.consumer_count)

    def inspect(self, name: str, arguments: dict[str, Any], to: QueueType) -> QueueReport:
        counts = self._counts(name)
        self.consumers.append(counts[1] if counts else 0)
        if counts is None:
            return QueueReport(name, None, 0, f"to be declared as {to}")
        if self._declare_or_refused(name, arguments):
            return QueueReport(name, to, counts[0], f"already {to}")
        other = "classic" if to == "quorum" else "quorum"
        return QueueReport(name, other, counts[0], f"to become {to}")

    def declare(self, name: str, arguments: dict[str, Any]) -> None:
        if not self._declare_or_refused(name, arguments):
            raise MigrationRefused(
                f"{name} was declared meanwhile with other arguments; run the migration again"
            )

    def await_quiet(self, names: list[str], quiet_s: float) -> None:
        """Refuse as soon as one of ``names`` receives a message within ``quiet_s`` seconds."""
        before = {name: self._counts(name) for name in names}
        deadline = time.monotonic() + quiet_s
        while (left := deadline - time.monotonic()) > 0:
            self.connection.sleep(min(_QUIET_POLL_S, left))
            grew = [
                f"{name} (+{after[0] - was[0]})"
                for name, was in before.items()
                if was is not None and (after := self._counts(name)) is not None and after[0] > was[0]
            ]
            if grew:
                raise MigrationRefused(
                    f"messages arrived in {', '.join(grew)}: {_PUBLISHERS}; nothing was changed"
                )

    def migrate(self, name: str, arguments: dict[str, Any], to: QueueType) -> int:
        temporary = name + MIGRATING_SUFFIX
        self.channel.queue_declare(
            temporary, durable=True, arguments={"x-queue-type": "quorum"} if to == "quorum" else {}
        )
        counts = self._counts(name)
        moved = self._move(name, temporary, limit=counts[0] if counts else None)
        if not self._delete_if_empty(name, quorum=to == "classic"):
            self._give_back(temporary, name, moved, to)
            raise MigrationRefused(f"a message arrived in {name} during its migration: {_PUBLISHERS}")
        if not self._declare_or_refused(name, arguments):
            self._give_back(temporary, name, moved, to)
            raise MigrationRefused(
                f"{name} was declared again with its old type during its migration: {_PUBLISHERS}"
            )
        # A channel remembers the type of a queue it used by name: publishing into the new queue
        # on the old channel fails (541 INTERNAL_ERROR on RabbitMQ 3.10).
        self.channel.close()
        self.channel = self._fresh()
        if not self._moved_back(temporary, name, moved, to):
            raise MigrationRefused(f"{temporary} is not empty: run the migration again")
        return moved

    def _give_back(self, temporary: str, name: str, moved: int, to: QueueType) -> None:
        """Return the moved messages to ``name``, still of its old type, after a refused swap."""
        if not self._moved_back(temporary, name, moved, to):
            raise MigrationRefused(
                f"a publisher is still sending to {name}, and {temporary} still holds messages: stop every "
                "publisher and run the migration again"
            )

    def _moved_back(self, temporary: str, name: str, moved: int, to: QueueType) -> bool:
        """Move the ``moved`` messages from ``temporary`` (of type ``to``) to ``name`` and delete
        ``temporary``; False when the counts differ or it is not empty."""
        return self._move(temporary, name) == moved and self._delete_if_empty(
            temporary, quorum=to == "quorum"
        )

    def _delete_if_empty(self, name: str, *, quorum: bool = False) -> bool:
        """Delete ``name`` if it holds no message. RabbitMQ does not take ``if_empty`` for a quorum
        queue: one is deleted once seen empty."""
        if quorum:
            counts = self._counts(name)
            if counts is not None and counts[0]:
                return False
            self.channel.queue_delete(name)
            return True
        return self._unless_precondition_failed(lambda: self.channel.queue_delete(name, if_empty=True))

    def _move(self, source: str, target: str, *, limit: int | None = None) -> int:
        """Move every message of ``source`` (at most ``limit``) to ``target``; each is acknowledged
        after its copy is confirmed."""
        moved = 0
        while limit is None or moved < limit:
            method, properties, body = self.channel.basic_get(source, auto_ack=False)
            if method is None:
                return moved
            try:
                self.channel.basic_publish("", target, body, properties, mandatory=True)
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
                self.channel.basic_nack(method.delivery_tag, requeue=True)
                raise MigrationRefused(f"RabbitMQ did not take a message into {target}: {e}") from e
            except pika.exceptions.ChannelClosedByBroker as e:
                self.channel = self._fresh()  # the message went back to source unacknowledged
                raise MigrationRefused(
                    f"RabbitMQ refused to move a message from {source} ({e.reply_text}); a message published "
                    "by another RabbitMQ user moves only for a user with the impersonator tag"
                ) from e
            self.channel.basic_ack(method.delivery_tag)
            moved += 1
        return moved


__all__ = ["MIGRATING_SUFFIX", "MigrationRefused", "QueueReport", "migrate_queues"]
