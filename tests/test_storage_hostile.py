"""Whatever a publisher puts in a message, its dead-letter entry is stored (or the message stays on
the broker), entries of other messages stay untouched, database trouble that is not the job's
fault is an outage, and what publishers chose is printed escaped."""

from __future__ import annotations

import io
import json
import logging
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from tests.support.faults import dramatiq_message
from tests.support.hostile import assert_lanes_still_work, publish_raw_message
from tests.support.ledger import wait_dead, wait_final, wait_status
from tests.support.observe import wait_for
from tests.support.services import (
    RunningWorker,
    add_tenant,
    database_url,
    delete_queues,
    isolated_settings,
    postbote,
    send_jobs,
)
from tests.support.smtp import received_messages
from worker.db import (
    KEEPALIVES,
    Connection,
    connect,
    drop_database,
    ensure_database,
    make_pool,
    translated_errors,
    upgrade,
)
from worker.errors import DatabaseUnavailable
from worker.job.deadletter import DeadJob, store_dead_job
from worker.logs import configure_logging, log_outcome
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.tools.dlq import Filters, count_dead, list_dead
from worker.vocabulary import LogOutcome, Reason


def a_job(tenant: str, **changes: Any) -> dict[str, Any]:
    job = make_job(tenant, "invoice", 1, user_id="u1", to="kunde@example.com")
    job.update(changes)
    return job


def listed(settings: Settings, *args: str) -> list[dict[str, Any]]:
    result = postbote(settings, "dlq", "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    entries: list[dict[str, Any]] = json.loads(result.stdout)
    return entries


def a_dead_job(message: dict[str, Any] | None = None, **fields: Any) -> DeadJob:
    entry_id = str(uuid.uuid4())
    return DeadJob(
        **{
            "id": entry_id,
            "queue_name": "pbtest.documents",
            "reason": Reason.INVALID_JOB,
            "detail": "invalid job: subject: must not contain line breaks or control characters",
            "attempts": 1,
            "tenant": f"t{uuid.uuid4().hex[:8]}",
            "message": message
            if message is not None
            else {
                "queue_name": "pbtest.documents",
                "actor_name": "send_document",
                "args": [{"job_id": entry_id, "subject": "Rechnung"}],
                "kwargs": {},
                "options": {},
                "message_id": entry_id,
            },
            **fields,
        }
    )


# 1. A dead-letter entry is stored whatever the message holds.


def test_a_nul_in_the_subject_is_dead_lettered_as_raw_bytes_and_listed(
    settings: Settings, worker: RunningWorker, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant()
    job = a_job(tenant, subject="Rechnung\u0000")
    publish_raw_message(settings, dramatiq_message(settings, job))
    dead = wait_dead(db, job["job_id"])
    assert dead["reason"] == "invalid_job"
    assert "subject" in dead["detail"] and Reason.UNSTORABLE in dead["detail"]
    assert dead["message"] is None
    assert json.loads(bytes(dead["raw_body"]))["args"][0]["subject"] == "Rechnung\u0000"
    [entry] = [e for e in listed(settings, "--tenant", tenant) if e["id"] == job["job_id"]]
    assert entry["reason"] == "invalid_job"
    shown = postbote(settings, "dlq", "show", job["job_id"])
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["job"]["subject"] == "Rechnung\u0000"
    assert_lanes_still_work(settings, db, tenant)


def test_an_unpaired_surrogate_in_the_tenant_is_dead_lettered_with_a_visible_replacement(
    settings: Settings, worker: RunningWorker, make_tenant: Any, db: Connection
) -> None:
    marker = uuid.uuid4().hex[:8]
    job = a_job(f"acme{marker}\ud800")
    publish_raw_message(settings, dramatiq_message(settings, job))
    dead = wait_dead(db, job["job_id"])
    assert dead["reason"] == "invalid_job"
    assert dead["tenant_id"] == f"acme{marker}\ufffd"
    assert Reason.UNSTORABLE in dead["detail"]
    assert [e["id"] for e in listed(settings, "--tenant", f"acme{marker}\ufffd")] == [job["job_id"]]
    assert_lanes_still_work(settings, db, make_tenant())


def test_a_valid_job_with_a_nul_in_its_body_fails_into_the_dead_letter_queue_and_replays(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = f"late{uuid.uuid4().hex[:8]}"
    job = a_job(tenant, body={"text": "Guten Tag,\u0000 anbei die Rechnung."})
    publish_raw_message(settings, dramatiq_message(settings, job))
    row = wait_final(db, [job["job_id"]])[job["job_id"]]
    assert (row["status"], row["reason"]) == ("failed", "unknown_tenant")
    dead = wait_dead(db, job["job_id"])
    assert dead["reason"] == "unknown_tenant"
    assert Reason.UNSTORABLE in dead["detail"]
    assert [e["id"] for e in listed(settings, "--reason", "unknown_tenant", "--tenant", tenant)] == [
        job["job_id"]
    ]

    make_tenant(id=tenant)
    replayed = postbote(settings, "dlq", "replay", job["job_id"])
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    wait_status(db, job["job_id"], "sent")
    assert [str(m["X-Postbote-Job"]) for _, m in received_messages(sink, timeout=3, count=2)] == [
        job["job_id"]
    ]
    assert_lanes_still_work(settings, db, tenant)


def test_text_fields_postgresql_refuses_are_stored_replaced_and_shortened(db: Connection) -> None:
    dead = a_dead_job(
        detail="bad \u0000 and \udc80",
        smtp_reply="550 \u0000",
        doc_number="RE\ud800",
        attempts=10**12,
    )
    dead = replace(dead, tenant="x\u0000" * 5000, id=dead.id + "\u0000" * 3)
    stored = store_dead_job(db, dead)
    row = db.execute("SELECT * FROM dead_letters WHERE id = %s", (stored,)).fetchone()
    assert row is not None
    assert row["id"].startswith(dead.id.replace("\u0000", "\ufffd"))
    assert row["detail"] == "bad \ufffd and \ufffd"
    assert (row["smtp_reply"], row["doc_number"]) == ("550 \ufffd", "RE\ufffd")
    assert len(row["tenant_id"]) <= 255 and row["tenant_id"].startswith("x\ufffdx\ufffd")
    assert row["attempts"] == 2**31 - 1
    assert row["message"] == dead.message


@pytest.fixture
def refusing_store(settings: Settings) -> Iterator[Connection]:
    """A session whose ``dead_letters`` (a temporary table in front of the real one) refuses
    every row as bad data."""
    with connect(settings.database_url, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE dead_letters (LIKE public.dead_letters INCLUDING ALL)")
        conn.execute(
            "CREATE FUNCTION pg_temp.refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = 'data_exception'; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON pg_temp.dead_letters"
            " FOR EACH ROW EXECUTE FUNCTION pg_temp.refuse()"
        )
        yield conn


def test_an_entry_refused_even_as_raw_bytes_raises_so_the_message_is_not_acknowledged(
    refusing_store: Connection,
) -> None:
    with pytest.raises(DatabaseUnavailable, match="refused"):
        store_dead_job(refusing_store, a_dead_job())
    with pytest.raises(DatabaseUnavailable, match="refused"):
        store_dead_job(refusing_store, a_dead_job(message={"args": ["\u0000"]}))


# 3. An entry is never overwritten by another message with the same id.


def test_the_same_message_dead_lettered_twice_updates_its_own_entry(db: Connection) -> None:
    first = a_dead_job()
    assert store_dead_job(db, first) == first.id
    redelivered = {**(first.message or {}), "options": {"retries": 2}, "message_id": "m2"}
    again = replace(first, detail="again", attempts=3, message=redelivered)
    assert store_dead_job(db, again) == first.id
    rows = db.execute(
        "SELECT id, detail, attempts FROM dead_letters WHERE id LIKE %s", (first.id + "%",)
    ).fetchall()
    assert [(r["id"], r["detail"], r["attempts"]) for r in rows] == [(first.id, "again", 3)]

    plain = a_dead_job()
    unstorable = replace(plain, message={**(plain.message or {}), "args": ["\u0000"]})
    assert store_dead_job(db, unstorable) == unstorable.id
    assert store_dead_job(db, unstorable) == unstorable.id
    assert db.execute(
        "SELECT count(*) AS n FROM dead_letters WHERE id LIKE %s", (unstorable.id + "%",)
    ).fetchone() == {"n": 1}


def test_raw_bodies_nested_too_deeply_to_decode_are_stored_once(db: Connection) -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    dead = a_dead_job(reason=Reason.MALFORMED_JSON, raw_body=body)
    dead = replace(dead, message=None)
    assert store_dead_job(db, dead) == dead.id
    assert store_dead_job(db, replace(dead, detail="again")) == dead.id
    row = db.execute("SELECT detail, raw_body FROM dead_letters WHERE id = %s", (dead.id,)).fetchone()
    assert row is not None and (row["detail"], bytes(row["raw_body"])) == ("again", body)


def test_a_crafted_message_with_a_dead_jobs_id_gets_an_entry_of_its_own(
    settings: Settings, worker: RunningWorker, make_tenant: Any, db: Connection
) -> None:
    tenant = f"late{uuid.uuid4().hex[:8]}"
    [job_id] = send_jobs(settings, [a_job(tenant)])
    original = wait_dead(db, job_id)
    assert original["reason"] == "unknown_tenant"

    # the same job id with an invalid job of another tenant, then with a valid job of another
    # payload whose message id is the job id too
    forged = a_job("mallory", job_id=job_id, subject="Forged\u0000")
    publish_raw_message(settings, dramatiq_message(settings, forged))
    conflicting = a_job(tenant, job_id=job_id, subject="Another payload")
    publish_raw_message(settings, dramatiq_message(settings, conflicting, message_id=job_id))

    def entries() -> list[dict[str, Any]] | None:
        rows = db.execute(
            "SELECT * FROM dead_letters WHERE id LIKE %s ORDER BY dead_at", (job_id + "%",)
        ).fetchall()
        return rows if len(rows) == 3 else None

    rows = wait_for(entries, timeout=30, what="three dead entries")
    kept = next(r for r in rows if r["id"] == job_id)
    assert (kept["reason"], kept["tenant_id"], kept["detail"]) == (
        original["reason"],
        original["tenant_id"],
        original["detail"],
    )
    assert kept["message"] == original["message"]
    others = {r["reason"]: r for r in rows if r["id"] != job_id}
    assert set(others) == {"invalid_job", "job_id_conflict"}
    assert others["invalid_job"]["tenant_id"] == "mallory"
    assert all(r["id"].startswith(f"{job_id}~") for r in others.values())
    assert wait_status(db, job_id, "failed")["reason"] == "unknown_tenant"
    assert_lanes_still_work(settings, db, make_tenant())


# 2. Database trouble that is not the job's fault is an outage.


@pytest.mark.parametrize(
    "error",
    [
        errors.AdminShutdown,
        errors.QueryCanceled,
        errors.ReadOnlySqlTransaction,
        errors.DuplicatePreparedStatement,
        errors.InvalidSqlStatementName,
        errors.InsufficientPrivilege,
        errors.UndefinedTable,
        errors.SerializationFailure,
        errors.DeadlockDetected,
        errors.IdleInTransactionSessionTimeout,
        errors.TooManyConnections,
        errors.DiskFull,
        psycopg.InterfaceError,
    ],
)
def test_database_errors_that_are_not_the_jobs_fault_are_outages(error: type[psycopg.Error]) -> None:
    with pytest.raises(DatabaseUnavailable), translated_errors():
        raise error("trouble")


@pytest.mark.parametrize(
    "error",
    [
        errors.UntranslatableCharacter,
        errors.NumericValueOutOfRange,
        errors.UniqueViolation,
        errors.SyntaxError,
    ],
)
def test_refused_values_and_our_own_sql_mistakes_are_not_outages(error: type[psycopg.Error]) -> None:
    with pytest.raises(error), translated_errors():
        raise error("ours")


def test_connections_have_keepalives_a_statement_timeout_and_no_prepared_statements(
    settings: Settings,
) -> None:
    with connect(settings.database_url, statement_timeout_ms=150) as conn:
        params = conn.info.get_parameters()
        assert (params["keepalives"], params["keepalives_idle"], params["keepalives_count"]) == (
            "1",
            str(KEEPALIVES["keepalives_idle"]),
            str(KEEPALIVES["keepalives_count"]),
        )
        assert conn.prepare_threshold is None
        assert conn.execute("SHOW statement_timeout").fetchone() == {"statement_timeout": "150ms"}
        with pytest.raises(DatabaseUnavailable, match="QueryCanceled"), translated_errors():
            conn.execute("SELECT pg_sleep(2)")
    pool = make_pool(settings.database_url, max_size=1)
    try:
        with pool.connection() as conn:
            assert conn.prepare_threshold is None
            assert conn.execute("SHOW statement_timeout").fetchone() == {"statement_timeout": "30s"}
    finally:
        pool.close()


def read_only_default(settings: Settings, database: str, on: bool) -> None:
    """Make new sessions of ``database`` read-only (like a standby behind the URL), or not."""
    with connect(settings.database_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = {}").format(
                sql.Identifier(database), sql.SQL("on" if on else "off")
            )
        )


def test_a_read_only_database_is_an_outage_and_the_job_is_sent_once_it_is_writable(
    settings: Settings, sink: Sink, tmp_path: Path
) -> None:
    name = f"postbote_ro_{uuid.uuid4().hex[:10]}"
    url = database_url(name)
    ensure_database(url)
    read_only = isolated_settings(settings, database_url=url, max_attempts=2)
    try:
        with connect(url) as conn:
            upgrade(conn)
        tenant = add_tenant(url, sink, tmp_path)
        read_only_default(settings, name, True)
        running = RunningWorker(read_only, threads=2)
        try:
            [job_id] = send_jobs(read_only, [a_job(tenant)])
            # Far more failed deliveries than max_attempts allows: none of them used an attempt.
            wait_for(
                lambda: running.output().count("ReadOnlySqlTransaction") >= 5,
                timeout=60,
                what="five deliveries refused by the read-only database",
            )
            with connect(url, autocommit=True) as conn:
                row = conn.execute("SELECT status FROM deliveries WHERE job_id = %s", (job_id,)).fetchone()
                assert row is None or row["status"] == "retrying", row
                assert conn.execute("SELECT count(*) AS n FROM dead_letters").fetchone() == {"n": 0}
            assert sink.handler.received == []

            read_only_default(settings, name, False)
            with connect(url, autocommit=True) as conn:
                assert wait_final(conn, [job_id], timeout=60)[job_id]["status"] == "sent"
                assert conn.execute("SELECT count(*) AS n FROM dead_letters").fetchone() == {"n": 0}
            assert [str(m["X-Postbote-Job"]) for _, m in received_messages(sink, timeout=3, count=2)] == [
                job_id
            ]
        finally:
            running.stop()
    finally:
        delete_queues(read_only)
        drop_database(url)


# 4. What publishers chose is listed cheaply and printed escaped.


def test_list_and_count_leave_the_messages_in_the_database(db: Connection) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        store_dead_job(db, a_dead_job(tenant=tenant))
    entries = list_dead(db, Filters(tenant=tenant))
    assert len(entries) == 3 == count_dead(db, Filters(tenant=tenant))
    assert all(e.message is None and e.raw_body is None for e in entries)


def test_dlq_list_escapes_terminal_sequences_and_line_breaks(settings: Settings, db: Connection) -> None:
    tenant = f"evil{uuid.uuid4().hex[:6]}\x1b[31m\nFORGED"
    dead = a_dead_job(tenant=tenant, doc_type="invoice", doc_number="RE\x9b2J")
    store_dead_job(db, dead)
    table = postbote(settings, "dlq", "list", "--tenant", tenant)
    assert table.returncode == 0, table.stderr
    assert "\x1b" not in table.stdout and "\x9b" not in table.stdout
    assert not any(line.startswith("FORGED") for line in table.stdout.splitlines())
    assert "\\x1b[31m\\nFORGED" in table.stdout
    assert "RE\\x9b2J" in table.stdout
    shown = postbote(settings, "dlq", "show", dead.id)
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and json.loads(shown.stdout)["tenant"] == tenant


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    """The worker's text logging, written to a buffer."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.stderr)
    buffer = io.StringIO()
    sys.stderr = buffer
    try:
        configure_logging("text")
        yield buffer
    finally:
        root.handlers[:], root.level, sys.stderr = saved[0], saved[1], saved[2]


def test_the_text_log_escapes_what_publishers_chose(text_log: io.StringIO) -> None:
    log_outcome(
        LogOutcome.FAILED,
        tenant="evil\x1b[31m\nFORGED INFO postbote.outcome job sent",
        detail="invalid job\r\nFORGED reason=ok",
    )
    logging.getLogger("postbote.test").warning("dead-lettered %s", "id\nFORGED")
    try:
        raise ValueError("boom\nFORGED")
    except ValueError:
        logging.getLogger("postbote.test").exception("failed")
    output = text_log.getvalue()
    assert "\x1b" not in output and "\r" not in output
    assert not any(line.startswith("FORGED") for line in output.splitlines())
    assert 'tenant="evil\\x1b[31m\\nFORGED INFO postbote.outcome job sent"' in output
    assert 'detail="invalid job\\r\\nFORGED reason=ok"' in output
    assert "dead-lettered id\\nFORGED" in output
    assert "  ValueError: boom" in output
    assert sum(1 for line in output.splitlines() if not line.startswith(" ")) == 3
