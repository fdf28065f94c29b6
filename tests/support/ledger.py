"""Reading the ledger and the dead-letter store: waiting for a job's outcome, its recipients' states."""

from __future__ import annotations

import time
from typing import Any

from worker.db import Connection


def wait_final(db: Connection, job_ids: list[str], timeout: float = 60) -> dict[str, dict[str, Any]]:
    """Wait until every job has a final ledger status; returns the rows by job id."""
    deadline = time.monotonic() + timeout
    rows: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        found = db.execute(
            "SELECT * FROM deliveries WHERE job_id = ANY(%s::uuid[]) AND status IN ('sent', 'partial', 'failed', 'cancelled', 'expired')",
            (job_ids,),
        ).fetchall()
        rows = {str(r["job_id"]): r for r in found}
        if len(rows) == len(job_ids):
            return rows
        time.sleep(0.1)
    open_rows = db.execute(
        "SELECT job_id, status, reason, attempts, takeovers, claimed_by, claimed_until - clock_timestamp() AS claim_left,"
        " next_attempt_at - clock_timestamp() AS next_in FROM deliveries"
        " WHERE job_id = ANY(%s::uuid[]) AND NOT job_id = ANY(%s::uuid[])",
        (job_ids, list(rows)),
    ).fetchall()
    missing = len(job_ids) - len(rows) - len(open_rows)
    raise AssertionError(
        f"only {len(rows)} of {len(job_ids)} jobs ended within {timeout}s;"
        f" {missing} have no ledger row; the others: {open_rows}"
    )


def wait_status(db: Connection, job_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
    """The ledger row of ``job_id`` once it has ``status``."""
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        row = db.execute("SELECT * FROM deliveries WHERE job_id = %s", (job_id,)).fetchone()
        if row is not None and row["status"] == status:
            return row
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} is not {status} after {timeout}s: {row}")


def wait_dead(db: Connection, entry_id: str, timeout: float = 30) -> dict[str, Any]:
    """The dead-letter entry ``entry_id`` once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = db.execute("SELECT * FROM dead_letters WHERE id = %s", (entry_id,)).fetchone()
        if row is not None:
            return row
        time.sleep(0.1)
    raise AssertionError(f"{entry_id} was not dead-lettered within {timeout}s")


def dead_reasons(db: Connection, job_ids: list[str]) -> dict[str, str]:
    """The dead-letter reason of each of ``job_ids`` that is in the dead-letter store."""
    rows = db.execute(
        "SELECT job_id::text AS job_id, reason FROM dead_letters WHERE job_id = ANY(%s::uuid[])", (job_ids,)
    ).fetchall()
    return {str(r["job_id"]): str(r["reason"]) for r in rows}


def recipient_states(db: Connection, job_id: str) -> dict[str, tuple[str, str]]:
    """Each envelope recipient of a job with its role and state, as the ledger has them."""
    rows = db.execute(
        "SELECT address, role, state FROM delivery_recipients WHERE job_id = %s ORDER BY position", (job_id,)
    ).fetchall()
    return {str(r["address"]): (str(r["role"]), str(r["state"])) for r in rows}


__all__ = ["dead_reasons", "recipient_states", "wait_dead", "wait_final", "wait_status"]
