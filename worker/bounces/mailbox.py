"""The supervisor's watch on every tenant's bounce mailbox (``bounces.imap``): one thread per
tenant, IDLE where the server offers it (a report is read the moment it arrives), otherwise a look
every ``poll_ms``. A tenant file change starts, restarts or ends a tenant's watch within
``_RELOAD_S``. Also ``postbote_bounces_total{tenant,class}``, counted from the ledger so reports
ingested by ``postbote bounces ingest`` (a local MTA's pipe) count too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, Metric
from pydantic import ValidationError

from schemas import constants as names
from schemas.tenant import Imap
from worker.bounces.imap import Mailbox, load_bounces, token_helpers_of
from worker.db import connect, translated_errors
from worker.errors import PostboteError
from worker.job.accounts import SecretAccess
from worker.settings import Settings

logger = logging.getLogger(__name__)

_RELOAD_S = 15.0
_IDLE_S = 10.0
"""An IDLE is renewed this often, so a stop or a settings change is seen soon."""
_RETRY_S = (1.0, 60.0)


@dataclass
class _Watch:
    imap: Imap
    stop: threading.Event
    thread: threading.Thread


def watch_mailboxes(settings: Settings, stop: threading.Event) -> None:
    """Watch every tenant's bounce mailbox until ``stop`` is set."""
    watches: dict[str, _Watch] = {}
    try:
        while not stop.is_set():
            wanted = _configured(settings)
            for tenant, watch in list(watches.items()):
                if wanted.get(tenant) != watch.imap or not watch.thread.is_alive():
                    watch.stop.set()
                    del watches[tenant]
            for tenant, imap in wanted.items():
                if tenant not in watches:
                    own = threading.Event()
                    thread = threading.Thread(
                        target=_watch,
                        args=(settings, tenant, imap, own),
                        name=f"bounces-{tenant}",
                        daemon=True,
                    )
                    watches[tenant] = _Watch(imap, own, thread)
                    thread.start()
            stop.wait(_RELOAD_S)
    finally:
        for watch in watches.values():
            watch.stop.set()


def _configured(settings: Settings) -> dict[str, Imap]:
    """Every tenant's ``bounces.imap``; a tenant whose settings do not open here is left out, with
    a warning."""
    access = SecretAccess.from_settings(settings)
    with translated_errors(), connect(settings.database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id FROM tenants WHERE jsonb_typeof(bounces->'imap') = 'object' ORDER BY id"
        ).fetchall()
        found = {}
        for r in rows:
            tenant = str(r["id"])
            try:
                bounces = load_bounces(conn, tenant, access)
            except (PostboteError, ValidationError) as e:
                logger.warning("bounce mailbox of tenant %s is not watched: %s", tenant, e)
                continue
            if bounces is not None and bounces.imap is not None:
                found[tenant] = bounces.imap
    return found


def _watch(settings: Settings, tenant: str, imap: Imap, stop: threading.Event) -> None:
    delay = _RETRY_S[0]
    while not stop.is_set():
        mailbox = None
        try:
            mailbox = Mailbox(
                tenant,
                imap,
                timeout_s=max(settings.smtp_timeout_ms / 1000, _IDLE_S + 5),
                token_helpers=token_helpers_of(settings),
            )
            with connect(settings.database_url, autocommit=True) as conn:
                while not stop.is_set():
                    done = mailbox.look(conn)
                    delay = _RETRY_S[0]
                    if done.read:
                        logger.info(
                            "bounces of tenant %s: read %d, %d reports, %d matched",
                            tenant,
                            done.read,
                            done.reports,
                            done.matched,
                        )
                    if mailbox.idle:
                        mailbox.wait(min(_IDLE_S, imap.poll_ms / 1000))
                    else:
                        stop.wait(imap.poll_ms / 1000)
        except PostboteError as e:
            logger.warning("bounce mailbox of tenant %s: %s; trying again in %.0f s", tenant, e, delay)
            stop.wait(delay)
            delay = min(delay * 2, _RETRY_S[1])
        finally:
            if mailbox is not None:
                mailbox.close()


class BounceCounts:
    """``postbote_bounces_total{tenant,class}``: the reports recorded in the ledger, by class."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            names.METRIC_BOUNCES.removesuffix("_total"),
            "Bounce reports recorded against a job's recipient, by RFC 3463 class (delayed: a delay"
            " warning, not a bounce).",
            labels=["tenant", "class"],
        )
        try:
            with (
                translated_errors(),
                connect(self._settings.database_url, autocommit=True, statement_timeout_ms=2000) as conn,
            ):
                rows = conn.execute(
                    "SELECT tenant_id, class, count(*) AS n FROM bounce_reports GROUP BY 1, 2 ORDER BY 1, 2"
                ).fetchall()
        except PostboteError:
            rows = []
        for r in rows:
            family.add_metric([str(r["tenant_id"]), str(r["class"])], int(r["n"]))
        yield family


__all__ = ["BounceCounts", "watch_mailboxes"]
