"""One message over an open connection: MAIL, RCPT, DATA, with partial refusals and 452."""

from __future__ import annotations

import smtplib
from dataclasses import dataclass, field

from worker.compose import Composed
from worker.errors import (
    SmtpRejected,
    SmtpTemporaryFailure,
)
from worker.smtp.connect import _Connection
from worker.smtp.replies import Delivery, SmtpReply, _classify, _expect, _translate


def _send_data(client: smtplib.SMTP, data: bytes) -> tuple[int, bytes]:
    """DATA with dot-stuffing; smtplib's ``data()`` also rewrites every line end with a regular
    expression, which costs more than the rest of the send for a message that has only CRLF."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        return client.data(data)
    client.putcmd("data")
    code, reply = client.getreply()
    if code != 354:
        raise smtplib.SMTPDataError(code, reply)
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    client.send(stuffed + b".\r\n")
    return client.getreply()


@dataclass
class _Progress:
    """Where a send stands: recipients not yet tried, the current transaction's, the done ones."""

    pending: list[str]
    batch: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    refused: dict[str, SmtpReply] = field(default_factory=dict)
    reply: SmtpReply | None = None
    stage: str = "MAIL FROM"


def _envelope(client: smtplib.SMTP, message: Composed, progress: _Progress) -> None:
    """MAIL FROM and RCPT TO for the next transaction, up to a 452 for too many recipients."""
    options = ["SMTPUTF8"] if message.smtputf8 else []
    if message.smtputf8 and not client.has_extn("smtputf8"):
        raise SmtpRejected(
            "an address has a non-ASCII local part and the server does not offer SMTPUTF8",
            reason="smtputf8_unsupported",
        )
    if "size" in client.esmtp_features:
        options.append(f"SIZE={len(message.data)}")
    if progress.accepted or progress.refused:
        client.rset()
    progress.stage = "MAIL FROM"
    _expect(client.mail(message.mail_from, options), progress.stage, client)
    progress.batch = []
    progress.stage = "RCPT TO"
    while progress.pending:
        rcpt = progress.pending[0]
        answer = SmtpReply.parse(*client.rcpt(rcpt))
        if answer.code == 452 and progress.batch:
            break
        progress.pending.pop(0)
        if answer.code in (250, 251):
            progress.batch.append(rcpt)
        elif answer.code == 421:
            raise _classify(answer, progress.stage)
        else:
            progress.refused[rcpt] = answer


def _transact(conn: _Connection, message: Composed, progress: _Progress | None = None) -> Delivery:
    """MAIL, RCPT, DATA; a 452 for too many recipients continues in a further transaction.

    ``progress`` is a send whose first envelope was already accepted (:meth:`SmtpPool.staged`).
    """
    client = conn.client
    p = progress or _Progress(list(message.recipients))
    try:
        while p.pending or p.batch:
            if not p.batch:
                _envelope(client, message, p)
                if not p.batch:
                    continue
            p.stage = "DATA"
            code, text = _send_data(client, message.data)
            p.reply = _expect((code, text), p.stage, client)
            p.accepted.extend(p.batch)
            p.batch = []
    except (OSError, smtplib.SMTPException, SmtpTemporaryFailure, SmtpRejected) as e:
        error = _translate(e, p.stage)
        if not p.accepted:
            raise error from e
        # An earlier transaction (after a 452) went through: resending would duplicate it,
        # so the recipients not reached are recorded as refused instead.
        lost = SmtpReply(0, None, str(error))
        p.refused.update({rcpt: lost for rcpt in [*p.batch, *p.pending]})
        assert p.reply is not None
    refused = p.refused
    if p.reply is None:
        transient = [r for r in refused.values() if r.code < 500]
        worst = transient[0] if transient else next(iter(refused.values()))
        summary = "; ".join(f"{a}: {r}" for a, r in refused.items())
        if transient:
            raise SmtpTemporaryFailure(f"no recipient accepted: {summary}", smtp_reply=str(worst))
        raise SmtpRejected(
            f"every recipient refused: {summary}", reason="recipients_refused", smtp_reply=str(worst)
        )
    return Delivery(tuple(p.accepted), refused, p.reply, conn.tls_version, conn.auth_method)
