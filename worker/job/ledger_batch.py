"""The ledger's claims and attempt records of all threads of a worker process, written together.

Each claim and each record is one call of a PostgreSQL function (``postbote_claim``,
``postbote_record_attempt``) that must be committed before its thread goes on: a claim before
SMTP, a record before the message is acknowledged. Written one by one, every call is a round
trip and a commit of its own, and each commit waits for a flush of the write-ahead log. Here
one thread of the process takes whatever the other threads asked for while the previous batch
ran (waiting up to ``GATHER_S`` for more while other threads are working on jobs), calls each
function once per request in one statement, commits once, and hands every thread its own
answer. No thread goes on before the commit that holds its write: the guarantees are those of
one call per transaction, for less work in both processes.

A batch that fails is rolled back and its calls are made again one by one, each in its own
transaction, so a value the database refuses fails only its own job, and an outage reaches
every thread that waited, as the error each would have got alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import psycopg

from worker.db import Connection, read_only, translated_errors
from worker.errors import DatabaseUnavailable

logger = logging.getLogger(__name__)

FUNCTIONS = {
    "postbote_claim": "postbote_claim({p}, {m})",
    "postbote_record_attempt": "to_jsonb(postbote_record_attempt({p}, {m}))",
}
"""The functions a batch may call, each taking ``(p jsonb, p_message bytea)``, and their call
answering jsonb."""

_IN_BATCH = {"p": "t.e->'p'", "m": "(%(messages)s::bytea[])[t.n]"}

_BATCH = (
    "SELECT t.n, CASE t.e->>'f' "
    + " ".join(f"WHEN '{name}' THEN {call.format(**_IN_BATCH)}" for name, call in FUNCTIONS.items())
    + " END AS answer FROM jsonb_array_elements(%(calls)s::jsonb) WITH ORDINALITY AS t(e, n)"
)
"""Every call of a batch in one statement, so in one transaction without a round trip more. The
calls go as one JSON array (``{"f": function, "p": fields}``), the messages as an array, or
NULL when there is none (most batches)."""

_ALONE = {name: f"SELECT {call.format(p='%s::jsonb', m='%s')} AS answer" for name, call in FUNCTIONS.items()}
"""One call in a statement of its own (simpler to plan than the batch's)."""

MAX_BATCH = 64

GATHER_S = 0.005
"""How long the writer waits at most for more calls after the first of a batch, while other
threads are working on jobs: a write waits up to this much longer, and a commit serves more
of them (PostgreSQL's ``commit_delay``, done here and only when there is company)."""


class _Call:
    """One thread's call, and its answer or error once ``done`` is released (a bare lock hands
    the answer over with less work than an event)."""

    __slots__ = ("answer", "done", "error", "fields", "finished", "function", "job", "message")

    def __init__(self, function: str, job: str, fields: str, message: bytes | None) -> None:
        self.function = function
        self.job = job
        self.fields = fields
        self.message = message
        self.answer: Any = None
        self.error: BaseException | None = None
        self.finished = False
        self.done = threading.Lock()
        self.done.acquire()

    def finish(self, answer: Any = None, error: BaseException | None = None) -> None:
        self.answer, self.error, self.finished = answer, error, True
        self.done.release()


class LedgerBatcher:
    """The process's writer of claims and records (a daemon thread, started on first use).

    ``connect`` opens the writer's connection (autocommit); it is opened again after a failure.
    ``wait_s`` bounds how long a thread waits for its answer (``None``: no bound). A batch waits
    up to ``gather_s`` after its first call for more, while it holds fewer calls than
    ``writers()``, the threads that may still write (those working on a job).
    """

    def __init__(
        self,
        connect: Callable[[], Connection],
        *,
        wait_s: float | None,
        gather_s: float = GATHER_S,
        writers: Callable[[], int] = lambda: MAX_BATCH,
    ) -> None:
        self._connect = connect
        self._wait_s = wait_s
        self._gather_s = gather_s
        self._writers = writers
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._conn: Connection | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def call(self, function: str, job: str, fields: str, message: bytes | None) -> Any:
        """``function(fields::jsonb, message)``'s answer for the job with id ``job``, once it is
        committed.

        Raises what the call alone would raise (through ``translated_errors``).
        """
        assert function in FUNCTIONS
        pending = _Call(function, job, fields, message)
        self._start()
        self._calls.put(pending)
        if not pending.done.acquire(timeout=-1 if self._wait_s is None else self._wait_s):
            raise DatabaseUnavailable("database unavailable: no answer from the ledger writer in time")
        if pending.error is not None:
            raise pending.error
        return pending.answer

    @property
    def thread(self) -> threading.Thread | None:
        """The writer's thread, once started."""
        return self._thread

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._calls.put(None)
            thread.join(timeout=10)
        self._disconnect()

    def _start(self) -> None:
        if self._closed:
            raise DatabaseUnavailable("database unavailable: the ledger writer is closed")
        if self._thread is not None:
            return
        with self._lock:
            if self._closed:
                raise DatabaseUnavailable("database unavailable: the ledger writer is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._calls.get()
            if first is None:
                return
            batch = [first]
            gather_until = time.monotonic() + self._gather_s
            while len(batch) < min(MAX_BATCH, self._writers()):
                try:
                    more = self._calls.get(timeout=max(0.0, gather_until - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self._calls.put(None)
                    break
                batch.append(more)
            try:
                self._write(batch)
            except BaseException as e:  # noqa: BLE001 - a waiting thread must always get an answer
                logger.exception("ledger writer failed")
                for pending in batch:
                    if not pending.finished:
                        pending.finish(
                            error=DatabaseUnavailable(f"database unavailable: {type(e).__name__}: {e}")
                        )

    def _write(self, batch: list[_Call]) -> None:
        if len(batch) > 1:
            try:
                with translated_errors():
                    answers = self._batched(batch)
            except (psycopg.Error, DatabaseUnavailable) as e:
                self._drop_if_broken()
                if self._conn is None and isinstance(e, DatabaseUnavailable):
                    # The server is gone: each call alone would only wait for it again.
                    for pending in batch:
                        pending.finish(error=DatabaseUnavailable(str(e)))
                    return
            else:
                for pending, answer in zip(batch, answers, strict=True):
                    pending.finish(answer)
                return
        for pending in batch:
            try:
                with translated_errors():
                    answer = self._alone(pending)
            except Exception as e:  # noqa: BLE001 - handed to the thread that asked
                self._drop_if_broken()
                pending.finish(error=e)
            else:
                pending.finish(answer)

    def _batched(self, batch: list[_Call]) -> list[Any]:
        # In job id order, the order `postbote cancel` locks jobs in: a batch holds the rows of
        # all its jobs until it ends, and two takers of the same rows in one order cannot deadlock.
        ordered = sorted(batch, key=lambda pending: pending.job)
        calls = ",".join(f'{{"f":"{pending.function}","p":{pending.fields}}}' for pending in ordered)
        messages = [pending.message for pending in ordered]
        rows = (
            self._connection()
            .execute(
                _BATCH,
                {
                    "calls": f"[{calls}]",
                    "messages": messages if any(m is not None for m in messages) else None,
                },
            )
            .fetchall()
        )
        answers = {id(ordered[row["n"] - 1]): row["answer"] for row in rows}
        return [answers[id(pending)] for pending in batch]

    def _alone(self, pending: _Call) -> Any:
        return call_alone(self._connection(), pending.function, pending.fields, pending.message)

    def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and (conn.closed or read_only(conn)):
            self._disconnect()
            conn = None
        if conn is None:
            conn = self._conn = self._connect()
        return conn

    def _drop_if_broken(self) -> None:
        conn = self._conn
        if conn is not None and (conn.closed or conn.broken):
            self._disconnect()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(psycopg.Error):
                conn.close()


def call_alone(conn: Connection, function: str, fields: str, message: bytes | None) -> Any:
    """``function(fields::jsonb, message)``'s answer, in a statement of its own on ``conn``."""
    row = conn.execute(_ALONE[function], (fields, message)).fetchone()
    assert row is not None
    return row["answer"]


__all__ = ["FUNCTIONS", "LedgerBatcher", "call_alone"]
