"""One message over an open connection: MAIL, RCPT, DATA, with partial refusals and 452."""

from __future__ import annotations

import smtplib
from dataclasses import dataclass, field

from worker.compose import Composed
from worker.errors import (
    SmtpConnectionError,
    SmtpRejected,
    SmtpTemporaryFailure,
)
from worker.smtp.connect import _Connection
from worker.smtp.replies import Delivery, SmtpReply, _classify, _expect, _translate


def _send_data(client: smtplib.SMTP, data: bytes, *, announced: bool = False) -> tuple[int, bytes]:
    """DATA (unless a pipelined DATA was already answered 354) and the message, dot-stuffed.

    The bytes go out as they are (see :class:`Composed`): rewriting line ends here, as
    smtplib's ``data()`` does, would break the DKIM signature made over them.
    """
    if not announced:
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


def _envelope(
    client: smtplib.SMTP, message: Composed, progress: _Progress, *, with_data: bool = False
) -> bool:
    """MAIL FROM and RCPT TO for the next transaction, up to a 452 for too many recipients.

    A server offering PIPELINING (RFC 2920) gets them in one write, followed by DATA
    when ``with_data``; returns whether that DATA was answered 354.
    """
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
    if client.has_extn("pipelining"):
        return _pipelined_envelope(client, message, progress, options, with_data)
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
    return False


def _pipelined_envelope(
    client: smtplib.SMTP, message: Composed, progress: _Progress, options: list[str], with_data: bool
) -> bool:
    """The envelope in one write; every reply is read before any is judged, so a connection
    that goes on being used never has an answer left unread."""
    if message.smtputf8:
        client.command_encoding = "utf-8"
    recipients = list(progress.pending)
    extra = "".join(" " + option for option in options)
    commands = [f"MAIL FROM:<{message.mail_from}>{extra}\r\n"]
    commands += [f"RCPT TO:<{rcpt}>\r\n" for rcpt in recipients]
    if with_data:
        commands.append("DATA\r\n")
    progress.stage = "MAIL FROM"
    client.send("".join(commands))
    answers = [client.getreply() for _ in commands]
    data_open = with_data and answers[-1][0] == 354
    try:
        _expect(answers[0], progress.stage, client)
        progress.stage = "RCPT TO"
        progress.batch, progress.pending = [], []
        too_many: dict[str, SmtpReply] = {}
        for rcpt, reply in zip(recipients, answers[1 : 1 + len(recipients)], strict=True):
            answer = SmtpReply.parse(*reply)
            if answer.code in (250, 251):
                progress.batch.append(rcpt)
            elif answer.code == 421:
                raise _classify(answer, progress.stage)
            elif answer.code == 452:
                too_many[rcpt] = answer
            else:
                progress.refused[rcpt] = answer
        if progress.batch:
            progress.pending = list(too_many)
        else:
            progress.refused.update(too_many)
            if data_open:
                raise SmtpConnectionError("DATA: the server opened DATA with no recipient accepted")
        if with_data and progress.batch:
            progress.stage = "DATA"
            if not data_open:
                raise smtplib.SMTPDataError(*answers[-1])
    except BaseException:
        if data_open:
            client.close()
        raise
    return data_open


def _transact(conn: _Connection, message: Composed, progress: _Progress | None = None) -> Delivery:
    """MAIL, RCPT, DATA; a 452 for too many recipients continues in a further transaction.

    ``progress`` is a send whose first envelope was already accepted (:meth:`SmtpPool.staged`).
    """
    client = conn.client
    p = progress or _Progress(list(message.recipients))
    try:
        while p.pending or p.batch:
            announced = False
            if not p.batch:
                announced = _envelope(client, message, p, with_data=True)
                if not p.batch:
                    continue
            p.stage = "DATA"
            code, text = _send_data(client, message.data, announced=announced)
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
