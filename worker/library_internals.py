"""Every use postbote makes of a library's internals, and the test that guards each.

Private names, undocumented attributes and helpers outside a library's public API can
change in any release. postbote reaches them only through the names below. The
versions they were checked against are the ranges pinned in ``pyproject.toml``;
``tests/test_dependency_pins.py`` fails when an installed version leaves its range, and
``tests/test_library_internals.py`` (``T`` below) fails, naming the internal and the
range, when an installed version no longer has what is used here.

pika (the RabbitMQ client)
  ``set_pika_read_size``, ``pika_read_size``: the class attribute
  ``pika.adapters.utils.io_services_utils._AsyncTransportBase._MAX_RECV_BYTES``, the
  ``recv()`` size of every pika connection. Used by ``worker/runtime/broker.py`` at import.
  Guarded by ``T::test_pika_reads_as_many_bytes_per_recv_as_the_worker_sets`` and
  ``tests/test_broker_reads.py``.
  ``underlying_channel``: ``BlockingChannel._impl``, the asynchronous ``pika.channel.Channel``
  behind a blocking one. Used by ``broker._BatchedAcks``. Guarded by
  ``T::test_a_blocking_channel_still_wraps_an_asynchronous_one``.

dramatiq
  ``RabbitmqConsumerBase``: ``dramatiq.brokers.rabbitmq._RabbitmqConsumer``, subclassed
  by ``broker._GuardedConsumer`` and its subclass ``broker._BatchedAcks``, which override
  ``__init__``, ``__next__``, ``ack`` and ``nack``, use the ``broker``, ``queue_name``,
  ``connection``, ``channel``, ``iterator`` (``BlockingChannel.consume``), ``known_tags``
  and ``logger`` its ``__init__`` sets, and are installed by overriding the undocumented
  ``RabbitmqBroker.consumer_class`` property. ``__next__`` replaces dramatiq's own
  (``next(self.iterator)``, connection errors as ``ConnectionClosed``, a vanished queue
  added to ``broker.queues_pending``, the tag added to ``known_tags``).
  Guarded by ``T::test_dramatiqs_rabbitmq_consumer_still_has_what_the_worker_overrides_and_uses``,
  ``T::test_dramatiqs_rabbitmq_consumer_still_reads_deliveries_as_the_worker_does``
  and ``tests/test_broker_acks.py``, ``tests/test_hostile_messages.py``.
  ``RabbitmqBrokerBase``: ``dramatiq.brokers.rabbitmq.RabbitmqBroker``, subclassed by
  ``broker._Broker``, which overrides the private ``_declare_queue``, ``_declare_dq_queue`` and
  ``_declare_xq_queue`` (each takes the canonical queue name; ``_ensure_queue`` calls all three
  for every queue still in ``queues_pending``) so that the queues carry postbote's arguments
  (quorum queues, ``producer.queues``), and uses the ``channel`` property. Guarded by
  ``T::test_dramatiqs_rabbitmq_broker_still_declares_a_lane_through_the_three_methods_the_worker_overrides``
  and ``tests/test_queue_types.py``.
  ``delivery_tag``: ``_RabbitmqMessage._tag``. Used by ``broker._BatchedAcks``. Guarded by
  ``T::test_dramatiqs_rabbitmq_messages_still_carry_their_delivery_tag``.
  ``rabbitmq_message``: builds a ``_RabbitmqMessage(redelivered, tag, message)``, what
  ``broker._GuardedConsumer.__next__`` returns. Guarded by
  ``T::test_dramatiqs_rabbitmq_messages_still_carry_their_delivery_tag``.
  ``set_delay_prefetch``: the undocumented ``Worker.delay_prefetch`` (set from the
  ``dramatiq_delay_queue_prefetch`` environment variable, else 1000 per thread), the
  prefetch ``Worker._add_consumer`` gives its ``.DQ`` consumers. Used by
  ``worker/runtime/process.py``. Guarded by
  ``T::test_dramatiqs_worker_still_prefetches_its_delay_queues_by_delay_prefetch``.
  Relied on without a name here: ``RabbitmqBroker.enqueue`` calls ``before_enqueue`` with the
  message it publishes, after setting a delayed one's ``eta`` option and ``.DQ`` queue, and
  the consumer thread holds a message with an ``eta`` until it is due, then enqueues it on
  the canonical queue (``worker/runtime/seal.py``, ``broker._GuardedConsumer``). Guarded by
  ``tests/test_seal.py::test_a_delayed_message_is_sealed_with_its_eta_and_delay_queue`` and
  ``tests/test_hostile_messages.py``.

psycopg
  ``AnswerLimited.wait`` in ``worker/db.py`` overrides ``psycopg.Connection.wait(gen, interval,
  timeout)``, through which every statement, commit and rollback of a connection waits for the
  server (``timeout`` raises the private ``psycopg.errors._WaitTimeout``, here
  ``PsycopgWaitTimeout``; ``PSYCOPG_WAIT_INTERVAL_S`` is psycopg's default ``interval``).
  Guarded by ``T::test_psycopg_still_waits_for_every_statement_through_connection_wait``.

dkimpy (none of these is in ``dkim.__all__``), used by ``worker/job/signature.py``, which
mirrors dkimpy's ``DKIM.sign`` step by step; ``tests/test_dkim_signing.py`` compares the
result byte for byte with stock dkimpy.
  ``dkimpy_relaxed_headers``: ``dkim.rfc822_parse`` and
  ``dkim.canonicalization.CanonicalizationPolicy``. Guarded by
  ``T::test_dkimpys_header_parser_and_relaxed_canonicalization_still_work_as_the_signer_expects``.
  ``hash_dkim_headers``: ``dkim.hash_headers``. Guarded by
  ``T::test_dkimpys_header_hashing_still_hashes_selected_headers_then_the_blank_signature``.
  ``blank_dkim_b_tag``: ``dkim.RE_BTAG``. Guarded by
  ``T::test_dkimpys_b_tag_pattern_still_blanks_the_signature_data``.
  ``fold_dkim_header``: ``dkim.fold``. Guarded by
  ``T::test_dkimpys_folding_still_breaks_at_72_columns_with_the_name_counted``.

smtplib (standard library; its reference documents ``docmd``, ``ehlo``, ``has_extn``,
``esmtp_features``, ``auth`` with ``auth_plain``/``auth_login``/``auth_cram_md5`` and the
``user``/``password`` attributes, ``starttls``, ``quit``, and names ``mail``/``rcpt``/``rset``
as supported)
  ``use_utf8_commands``: the undocumented ``SMTP.command_encoding``, the codec ``send`` and
  ``putcmd`` encode commands with (``mail()`` sets it for SMTPUTF8, ``rset()`` resets it).
  Used by the pipelined envelope in ``worker/job/smtp/transaction.py``.
  ``smtp_socket``, ``smtp_socket_closed``: the undocumented ``SMTP.sock`` (``None`` once
  closed, an ``ssl.SSLSocket`` after ``starttls`` or with ``SMTP_SSL``). Used by
  ``worker/job/smtp/connect.py`` for the TLS version and by ``SmtpPool._release``
  (``worker/job/smtp/pool.py``) to tell a connection dropped to abort a transaction.
  ``set_smtp_timeout``: the undocumented ``SMTP.timeout`` and ``SMTP.sock``. Used by
  ``worker/job/smtp/pool.py``.
  Guarded by ``T::test_smtplib_encodes_commands_with_its_command_encoding``,
  ``T::test_smtplib_keeps_its_socket_in_sock_until_closed`` and
  ``T::test_smtplib_connects_with_its_timeout_attribute``.
  Used directly, though public by name only (the reference leaves them out; smtplib's module
  docstring shows ``putcmd``/``getreply``): ``send``, ``getreply`` and ``close``, in
  ``transaction.py``. Guarded by ``T::test_smtplibs_low_level_methods_keep_their_signatures``.

aiosmtpd (the test sink; ``Controller.factory``, ``SMTP_kwargs``, ``SMTP.transport``,
``push`` and ``challenge_auth`` are documented)
  ``unread_input``: ``SMTP._reader``, the connection's ``asyncio.StreamReader``, and its
  private ``_buffer``: what the client sent that the server has not read yet. Used by
  ``tests/test_smtp_pipelining.py``. Guarded by
  ``T::test_a_sink_handler_sees_what_a_pipelining_client_sent_behind_the_command``.
  Relied on without a name here: aiosmtpd calls ``connection_made`` again, with
  ``transport`` already set, when STARTTLS succeeds (``worker/testbed/sink/faults.py``
  ``_ConnectionCountingSMTP``). Guarded by
  ``T::test_aiosmtpd_calls_connection_made_again_after_starttls``.

Each function is one attribute access or one call, with no checks: on the per-mail path
it costs a function call and nothing more.
"""

from __future__ import annotations

import hashlib
import smtplib
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import dkim
import pika.channel
import psycopg.errors
from dkim.canonicalization import CanonicalizationPolicy
from dramatiq import Message, Worker
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer, _RabbitmqMessage
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.io_services_utils import _AsyncTransportBase

if TYPE_CHECKING:
    from aiosmtpd.smtp import SMTP as SmtpServer

# pika


def set_pika_read_size(size: int) -> None:
    """Make every pika connection, existing or new, read up to ``size`` bytes per ``recv()``."""
    _AsyncTransportBase._MAX_RECV_BYTES = size


def pika_read_size() -> int:
    """The bytes a pika connection reads per ``recv()``."""
    return int(_AsyncTransportBase._MAX_RECV_BYTES)


def underlying_channel(channel: BlockingChannel) -> pika.channel.Channel:
    """The asynchronous channel a ``BlockingChannel`` drives: its methods queue frames without
    waiting for them to be written. Call it only on the connection's own thread."""
    return channel._impl


# dramatiq

RabbitmqBrokerBase = RabbitmqBroker
"""dramatiq's RabbitMQ broker, to subclass with postbote's queue declarations."""

RABBITMQ_DECLARATIONS = ("_declare_queue", "_declare_dq_queue", "_declare_xq_queue")
"""The methods of ``RabbitmqBroker`` that declare a lane's queues, which ``broker._Broker`` overrides."""

RabbitmqConsumerBase = _RabbitmqConsumer
"""dramatiq's RabbitMQ consumer, to subclass; ``RabbitmqBroker.consumer_class`` returns it."""


def delivery_tag(message: MessageProxy) -> int:
    """The AMQP delivery tag of a message a RabbitMQ consumer received."""
    return cast(int, message._tag)


def rabbitmq_message(redelivered: bool, tag: int, message: Message[Any]) -> MessageProxy:
    """What a RabbitMQ consumer returns for a delivery: ``message`` with its delivery tag."""
    return _RabbitmqMessage(redelivered, tag, message)  # type: ignore[no-untyped-call]


def set_delay_prefetch(worker: Worker, count: int) -> None:
    """Have ``worker``'s delay-queue consumers prefetch ``count`` messages; call before ``start()``."""
    worker.delay_prefetch = count


# psycopg

PsycopgWaitTimeout: type[psycopg.OperationalError] = psycopg.errors._WaitTimeout
"""What ``psycopg.Connection.wait`` raises when its ``timeout`` passed."""

PSYCOPG_WAIT_INTERVAL_S = 0.1
"""``psycopg.connection._WAIT_INTERVAL``, the default ``interval`` of ``Connection.wait``."""


# dkimpy

_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


def dkimpy_relaxed_headers(head: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields of ``head`` as dkimpy parses and relaxed-canonicalizes them.

    Raises:
      dkim.MessageFormatError: a line is no header field.
    """
    headers, _ = dkim.rfc822_parse(head)
    return cast(list[tuple[bytes, bytes]], _RELAXED.canonicalize_headers(headers))


def hash_dkim_headers(
    hasher: hashlib._Hash,
    canonical_headers: list[tuple[bytes, bytes]],
    include: Sequence[bytes],
    sigheader: tuple[bytes, bytes],
) -> None:
    """Feed ``hasher`` the ``include``-selected relaxed headers and then ``sigheader`` with an
    empty ``b=``, as dkimpy hashes them for a relaxed/relaxed signature."""
    dkim.hash_headers(hasher, _RELAXED, canonical_headers, include, sigheader, None)


def blank_dkim_b_tag(value: bytes) -> bytes:
    """A DKIM-Signature value with the data of its ``b=`` tag removed, as dkimpy does."""
    return cast(bytes, dkim.RE_BTAG.sub(b"\\1", value))


def fold_dkim_header(value: bytes, namelen: int) -> bytes:
    """``value`` folded with CRLF as dkimpy folds a header whose name is ``namelen`` long."""
    return cast(bytes, dkim.fold(value, namelen=namelen, linesep=b"\r\n"))


# smtplib


def use_utf8_commands(client: smtplib.SMTP) -> None:
    """Have ``client`` encode the commands it sends as UTF-8 (SMTPUTF8) until its next ``rset()``."""
    client.command_encoding = "utf-8"


def smtp_socket(client: smtplib.SMTP) -> socket.socket | None:
    """The socket ``client`` talks over (an ``ssl.SSLSocket`` once TLS is on), ``None`` when closed."""
    return client.sock


def smtp_socket_closed(client: smtplib.SMTP) -> bool:
    """Whether ``client`` has closed its connection (or never opened one)."""
    return client.sock is None


def set_smtp_timeout(client: smtplib.SMTP, timeout_s: float) -> None:
    """Apply ``timeout_s`` to the open connection of ``client`` and to any it opens later."""
    client.timeout = timeout_s
    if client.sock is not None:
        client.sock.settimeout(timeout_s)


# aiosmtpd


def unread_input(server: SmtpServer) -> bytes:
    """What the client has sent on ``server``'s connection that the server has not read yet."""
    return bytes(server._reader._buffer)  # type: ignore[attr-defined]


__all__ = [
    "PSYCOPG_WAIT_INTERVAL_S",
    "PsycopgWaitTimeout",
    "RABBITMQ_DECLARATIONS",
    "RabbitmqBrokerBase",
    "RabbitmqConsumerBase",
    "blank_dkim_b_tag",
    "delivery_tag",
    "dkimpy_relaxed_headers",
    "fold_dkim_header",
    "hash_dkim_headers",
    "pika_read_size",
    "rabbitmq_message",
    "set_delay_prefetch",
    "set_pika_read_size",
    "set_smtp_timeout",
    "smtp_socket",
    "smtp_socket_closed",
    "underlying_channel",
    "unread_input",
    "use_utf8_commands",
]
