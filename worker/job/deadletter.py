"""The dead-letter store: dead jobs with their final reason, kept in PostgreSQL until purged."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from uuid import UUID

import dramatiq
import psycopg
from dramatiq.common import q_name

from schemas.job import Job
from worker.db import Connection, storable, translated_errors
from worker.errors import DatabaseUnavailable
from worker.vocabulary import EventType, Reason, Status


@dataclass(frozen=True)
class DeadJob:
    id: str
    queue_name: str
    reason: str
    """A :class:`Reason` (or one an earlier version stored)."""
    detail: str
    attempts: int
    job_id: UUID | None = None
    tenant: str | None = None
    doc_type: str | None = None
    doc_number: str | None = None
    smtp_reply: str | None = None
    message: dict[str, Any] | None = None
    """The broker message as it was first published, for replay (``None`` when the store
    refused it as JSON, and in ``dlq list``'s entries, which leave it out)."""
    raw_body: bytes | None = None
    """The undecodable body, when the message was not even JSON; or the message's JSON bytes,
    when the store refused it as ``jsonb`` (see :func:`store_dead_job`)."""
    dead_at: datetime | None = None
    """When it was stored (``None`` before it is)."""

    @property
    def document(self) -> str:
        return " ".join(p for p in (self.doc_type, self.doc_number) if p) or "-"

    @property
    def replayable_message(self) -> dict[str, Any] | None:
        """The message a replay publishes: the stored one, or the one the raw bytes hold."""
        return self.message if self.message is not None else dramatiq_message_of(self.raw_body)

    def summary(self) -> dict[str, Any]:
        """The fields ``dlq list`` shows."""
        return {
            "id": self.id,
            "job_id": str(self.job_id) if self.job_id else None,
            "tenant": self.tenant,
            "document": self.document,
            "reason": self.reason,
            "attempts": self.attempts,
            "dead_at": self.dead_at.isoformat() if self.dead_at else None,
        }


def dead_job(
    message: dramatiq.MessageProxy | dramatiq.Message[Any] | None,
    *,
    reason: Reason,
    detail: str,
    attempts: int,
    job: Job | None = None,
    job_id: UUID | None = None,
    tenant: str | None = None,
    smtp_reply: str | None = None,
    keyed_by_message: bool = False,
) -> DeadJob:
    """The dead-letter entry of a message, with what is known of its job (the whole job, or
    only the id and tenant of one that did not validate).

    The entry is keyed by the job id when there is one and not ``keyed_by_message``,
    otherwise by the message id (a fresh id without a message). Both are chosen by the
    publisher: :func:`store_dead_job` keeps them from overwriting another message's entry.
    """
    if job is not None:
        job_id, tenant = job.job_id, job.tenant
    if job_id is not None and not keyed_by_message:
        entry_id = str(job_id)
    else:
        entry_id = str(message.message_id) if message else str(uuid.uuid4())
    return DeadJob(
        id=entry_id,
        queue_name=q_name(str(message.queue_name)) if message else "",
        reason=reason,
        detail=detail,
        attempts=attempts,
        job_id=job_id,
        tenant=tenant,
        doc_type=job.document.type.value if job else None,
        doc_number=job.document.number if job else None,
        smtp_reply=smtp_reply,
        message=message.asdict() if message else None,
    )


def store_dead_job(conn: Connection, dead: DeadJob) -> str:
    """Record a dead job; returns the id of its entry. Whatever the publisher put in the
    message, the entry is stored, or this raises and the caller must not acknowledge it.

    - Text fields are made storable (:func:`worker.db.storable`: NUL and unpaired surrogates
      become U+FFFD), ids and names too long for an index are shortened (with a digest), and
      ``attempts`` is clamped to the column's range.
    - A message PostgreSQL refuses as ``jsonb`` (``\\u0000``, an unpaired surrogate, ``NaN``,
      too big) is stored with ``message`` NULL and its JSON bytes in ``raw_body``. The entry
      keeps the reason the job died for (what ``dlq list --reason`` finds it by); its detail
      names ``unstorable``. ``dlq replay`` decodes such an entry's bytes again.
    - Ids are chosen by publishers (job id, message id), so an entry never overwrites the
      entry of another message: the same message (actor, arguments) dead-lettered again
      updates its own entry (reason, detail, attempts, reply, time; idempotent), another one
      is stored under ``<id>~<12 hex digits of the SHA-256 of its actor and arguments>``.

    Raises:
      DatabaseUnavailable: the database is unavailable (see ``translated_errors``), or it
        refused even the raw form of the entry.
    """
    entry = _storable(dead)
    fingerprint = _fingerprint(dead.message, dead.raw_body)
    try:
        document = json.dumps(entry.message, default=str) if entry.message is not None else None
        stored = _store(conn, entry, fingerprint, document)
    except DatabaseUnavailable:
        raise
    except (psycopg.Error, ValueError, RecursionError) as e:
        if entry.message is None:
            raise DatabaseUnavailable(f"the dead-letter store refused entry {entry.id!r}: {_why(e)}") from e
        why = f"{Reason.UNSTORABLE}: jsonb refused the message ({_why(e)}); its JSON bytes are kept"
        try:
            raw = replace(
                entry,
                detail=_text(f"{entry.detail} ({why})", _MAX_DETAIL_CHARS),
                message=None,
                # json.dumps escapes every non-ASCII character: bytea takes what jsonb refused.
                raw_body=json.dumps(entry.message, default=str).encode("ascii"),
            )
            stored = _store(conn, raw, fingerprint, None)
        except DatabaseUnavailable:
            raise
        except (psycopg.Error, ValueError, RecursionError) as e2:
            raise DatabaseUnavailable(f"the dead-letter store refused entry {entry.id!r}: {_why(e2)}") from e2
    if not conn.autocommit:
        conn.commit()
    return stored


_INSERT = """
INSERT INTO dead_letters (id, job_id, tenant_id, doc_type, doc_number, reason, detail, attempts,
                          smtp_reply, queue_name, message, raw_body)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (id) DO NOTHING
RETURNING id
"""


def _store(conn: Connection, dead: DeadJob, fingerprint: str, document: str | None) -> str:
    """Insert the entry under its id, or update it there when that entry is the same message's,
    or go on to the next id it may take; returns the id used."""
    for entry_id in (dead.id, f"{dead.id}~{fingerprint[:12]}", f"{dead.id}~{fingerprint}"):
        with translated_errors(), conn.transaction():
            for _ in range(2):
                if _insert(conn, dead, entry_id, document):
                    _emit_dead(conn, dead, entry_id)
                    return entry_id
                row = conn.execute(
                    "SELECT message::text AS message, message->>'actor_name' AS actor_name,"
                    " message->>'message_id' AS message_id, raw_body"
                    " FROM dead_letters WHERE id = %s FOR UPDATE",
                    (entry_id,),
                ).fetchone()
                if row is None:
                    continue  # replayed or purged since: the id is free again
                if _stored_fingerprint(row) != fingerprint:
                    break
                conn.execute(
                    "UPDATE dead_letters SET reason = %s, detail = %s, attempts = %s, smtp_reply = %s,"
                    " dead_at = now() WHERE id = %s",
                    (dead.reason, dead.detail, dead.attempts, dead.smtp_reply, entry_id),
                )
                _emit_dead(conn, dead, entry_id)
                return entry_id
    # Every id it may take holds another message (someone published messages with those ids).
    entry_id = f"{dead.id}~{uuid.uuid4().hex}"
    with translated_errors(), conn.transaction():
        _insert(conn, dead, entry_id, document)
    return entry_id


def _emit_dead(conn: Connection, dead: DeadJob, entry_id: str) -> None:
    """The ``dead`` event, in the entry's transaction: only for a job's own entry (keyed by its
    id) whose ledger row says failed, never for a message that merely names a job id."""
    if dead.job_id is not None and entry_id == str(dead.job_id):
        conn.execute(
            "SELECT postbote_emit_event(job_id, %s) FROM deliveries WHERE job_id = %s AND status = %s",
            (EventType.DEAD, dead.job_id, Status.FAILED),
        )


def _insert(conn: Connection, dead: DeadJob, entry_id: str, document: str | None) -> bool:
    row = conn.execute(
        _INSERT,
        (
            entry_id,
            dead.job_id,
            dead.tenant,
            dead.doc_type,
            dead.doc_number,
            dead.reason,
            dead.detail,
            dead.attempts,
            dead.smtp_reply,
            dead.queue_name,
            document,
            dead.raw_body,
        ),
    ).fetchone()
    return row is not None


def dramatiq_message_of(raw_body: bytes | None) -> dict[str, Any] | None:
    """The dramatiq message ``raw_body`` holds, when it is one (an entry whose message the
    store refused as JSON keeps it there); ``None`` for anything else."""
    if raw_body is None:
        return None
    try:
        data = json.loads(raw_body)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deeply
        return None
    if isinstance(data, dict) and {"queue_name", "actor_name", "args"} <= data.keys():
        return data
    return None


_MAX_KEY_CHARS = 255
"""Ids (the broker takes message ids up to 255 characters) and names, far below what a btree
index entry may hold (about 2.7 kB)."""
_MAX_DETAIL_CHARS = 8000
_INT4_MAX = 2**31 - 1


def _storable(dead: DeadJob) -> DeadJob:
    return replace(
        dead,
        id=_key(dead.id),
        tenant=_key(dead.tenant) if dead.tenant is not None else None,
        doc_type=_key(dead.doc_type) if dead.doc_type is not None else None,
        doc_number=_key(dead.doc_number) if dead.doc_number is not None else None,
        reason=_key(dead.reason),
        detail=_text(dead.detail, _MAX_DETAIL_CHARS),
        smtp_reply=_text(dead.smtp_reply, _MAX_DETAIL_CHARS) if dead.smtp_reply is not None else None,
        queue_name=_key(dead.queue_name),
        attempts=max(0, min(int(dead.attempts), _INT4_MAX)),
    )


def _key(text: str) -> str:
    """``text`` storable and short enough for an index; a long one keeps its start and a digest."""
    text = storable(str(text))
    if len(text) <= _MAX_KEY_CHARS:
        return text
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return f"{text[: _MAX_KEY_CHARS - 14]}…~{digest}"


def _text(text: str, limit: int) -> str:
    text = storable(str(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fingerprint(message: Any, raw_body: bytes | None) -> str:
    """What makes two dead messages the same: the actor and its arguments. Options, ids and
    times differ between deliveries of one message; a jsonb round trip may reorder keys and
    write ``1e2`` as ``100``. Arguments nested deeper than ``_MAX_DEPTH`` are represented by
    the message id (hashing them would recurse as deep)."""
    if not isinstance(message, dict):
        message = dramatiq_message_of(raw_body)
    if not isinstance(message, dict):
        return hashlib.sha256(raw_body or b"").hexdigest()
    content = [message.get("actor_name"), message.get("args"), message.get("kwargs")]
    if _deeper_than(content, _MAX_DEPTH):
        return _deep_fingerprint(message.get("actor_name"), message.get("message_id"))
    canonical = json.dumps(_normalized(content), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _stored_fingerprint(row: dict[str, Any]) -> str:
    """The fingerprint of a stored entry (its message selected as text, so a deep one is
    decoded here, where its depth is checked, not by the driver)."""
    raw_body = bytes(row["raw_body"]) if row["raw_body"] is not None else None
    if row["message"] is None:
        return _fingerprint(None, raw_body)
    try:
        message = json.loads(row["message"])
    except RecursionError:
        return _deep_fingerprint(row["actor_name"], row["message_id"])
    return _fingerprint(message, raw_body)


def _deep_fingerprint(actor_name: Any, message_id: Any) -> str:
    canonical = json.dumps(["nested too deeply", actor_name, message_id], default=str)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


_MAX_DEPTH = 100


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


def _normalized(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    return value


def _why(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


__all__ = ["DeadJob", "dead_job", "dramatiq_message_of", "store_dead_job"]
