"""One message over an open connection: MAIL, RCPT, DATA, with partial refusals and 452."""

from __future__ import annotations

import smtplib
from dataclasses import dataclass, field

from worker.errors import SmtpConnectionError, SmtpRejected, SmtpTemporaryFailure, Smtputf8Unsupported
from worker.job.compose import Composed
from worker.job.smtp.connect import _Connection
from worker.job.smtp.replies import Delivery, SmtpReply, _classify, _expect, _translate
from worker.library_internals import use_utf8_commands


def _send_data(client: smtplib.SMTP, data: bytes, *, announced: bool = False) -> tuple[int, bytes]:
    """DATA (unless a pipelined DATA was already answered 354) and the message, dot-stuffed.

    The bytes go out as they are (see :class:`Composed`): rewriting line ends here, as
    smtplib's ``data()`` does, would break the DKIM signature made over them.
    """
    if not announced:
        code, reply = client.docmd("data")
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
    open: bool = False
    """The server holds a MAIL FROM that neither DATA nor RSET has ended."""


def _envelope(
    client: smtplib.SMTP, message: Composed, progress: _Progress, *, with_data: bool = False
) -> bool:
    """MAIL FROM and RCPT TO for the next transaction, up to a 452 for too many recipients.

    A server offering PIPELINING (RFC 2920) gets them in one write, followed by DATA
    when ``with_data``; returns whether that DATA was answered 354.
    """
    options = ["SMTPUTF8"] if message.smtputf8 else []
    if message.smtputf8 and not client.has_extn("smtputf8"):
        raise Smtputf8Unsupported(
            "an address has a non-ASCII local part and the server does not offer SMTPUTF8"
        )
    if "size" in client.esmtp_features:
        options.append(f"SIZE={len(message.data)}")
    dsn = message.envid is not None and client.has_extn("dsn")
    if dsn:
        options += ["RET=HDRS", f"ENVID={_xtext(message.envid or '')}"]
    if progress.open:
        client.rset()
        progress.open = False
    if client.has_extn("pipelining"):
        return _pipelined_envelope(client, message, progress, options, with_data, dsn=dsn)
    progress.stage = "MAIL FROM"
    _expect(client.mail(message.mail_from, options), progress.stage, client)
    progress.open = True
    progress.batch = []
    progress.stage = "RCPT TO"
    while progress.pending:
        rcpt = progress.pending[0]
        answer = SmtpReply.parse(*client.rcpt(rcpt, _rcpt_options(rcpt, dsn)))
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
    client: smtplib.SMTP,
    message: Composed,
    progress: _Progress,
    options: list[str],
    with_data: bool,
    *,
    dsn: bool = False,
) -> bool:
    """The envelope in one write; every reply is read before any is judged, so a connection
    that goes on being used never has an answer left unread."""
    if message.smtputf8:
        use_utf8_commands(client)
    recipients = list(progress.pending)
    extra = "".join(" " + option for option in options)
    commands = [f"MAIL FROM:<{message.mail_from}>{extra}\r\n"]
    commands += [
        f"RCPT TO:<{rcpt}>{''.join(' ' + o for o in _rcpt_options(rcpt, dsn))}\r\n" for rcpt in recipients
    ]
    if with_data:
        commands.append("DATA\r\n")
    progress.stage = "MAIL FROM"
    client.send("".join(commands))
    answers = [client.getreply() for _ in commands]
    data_open = with_data and answers[-1][0] == 354
    try:
        _expect(answers[0], progress.stage, client)
        progress.open = True
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

    A transaction goes on to the message only when it carries a customer-facing
    recipient, or one took the message in an earlier transaction: internal copies
    (``message.internal``) never reach a server alone. A transaction holding only
    internal recipients is reset, or, when a pipelined DATA was already answered 354,
    the connection is dropped before the message, which aborts it (RFC 5321 4.1.1.4).
    An error ends the attempt; the recipients it left unanswered are retried later.
    ``progress`` is a send whose first envelope was already accepted (:meth:`SmtpPool.staged`).
    """
    client = conn.client
    p = progress or _Progress(list(message.recipients))
    error: SmtpTemporaryFailure | SmtpRejected | SmtpConnectionError | None = None
    try:
        while p.pending or p.batch:
            announced = False
            if not p.batch:
                announced = _envelope(client, message, p, with_data=True)
                if not p.batch:
                    continue
            if message.internal and not _reaches_customer(message, p):
                _hold_internal(client, message, p, announced)
                continue
            p.stage = "DATA"
            reply = SmtpReply.parse(*_send_data(client, message.data, announced=announced))
            p.open = False
            if not 200 <= reply.code < 300:
                p.refused.update({rcpt: reply for rcpt in p.batch})
                p.batch = []
                raise _classify(reply, p.stage)
            p.reply = reply
            p.accepted.extend(p.batch)
            p.batch = []
        if p.open:
            client.rset()  # an envelope refused entirely leaves its MAIL FROM with the server
            p.open = False
    except (OSError, smtplib.SMTPException, SmtpTemporaryFailure, SmtpRejected, SmtpConnectionError) as e:
        if p.stage == "DATA" and isinstance(e, smtplib.SMTPResponseException):
            reply = SmtpReply.parse(e.smtp_code, e.smtp_error)
            p.refused.update({rcpt: reply for rcpt in p.batch})
        error = _translate(e, p.stage)
    return Delivery(
        tuple(p.accepted),
        p.refused,
        p.reply,
        error,
        conn.tls_version,
        conn.auth_method,
        client.has_extn("dsn"),
    )


def _rcpt_options(rcpt: str, dsn: bool) -> list[str]:
    """DSN's RCPT parameters (RFC 3461): reports on failure and delay only, and the original
    address, so a report names it even after the receiving side rewrote it."""
    if not dsn:
        return []
    return ["NOTIFY=FAILURE,DELAY", f"ORCPT=rfc822;{_xtext(rcpt)}"]


def _xtext(value: str) -> str:
    """RFC 3461 xtext: ``+``, ``=``, controls and non-ASCII as ``+XX``."""
    return "".join(
        c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode()) for c in value
    )


def _reaches_customer(message: Composed, progress: _Progress) -> bool:
    return any(rcpt not in message.internal for rcpt in (*progress.batch, *progress.accepted))


def _hold_internal(client: smtplib.SMTP, message: Composed, p: _Progress, announced: bool) -> None:
    """Take a transaction that holds only internal recipients back from the server.

    They are tried again with the customer-facing recipients a 452 left, if any;
    otherwise they stay unanswered.
    """
    customers_left = any(rcpt not in message.internal for rcpt in p.pending)
    held, p.batch = p.batch, []
    if customers_left:
        p.pending.extend(held)
    else:
        p.pending = []
    p.open = False
    if announced:
        client.close()
        if customers_left:
            raise SmtpConnectionError("DATA: dropped a transaction that reached no customer-facing recipient")
    else:
        client.rset()
