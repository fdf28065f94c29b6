"""The worker's RabbitMQ connections read 64 KB per recv(), not 4 KB."""

from __future__ import annotations

from pika.adapters.utils.io_services_utils import _AsyncTransportBase

import worker.runtime.broker  # noqa: F401 - importing it sets the read size


def test_pika_still_reads_with_the_size_the_worker_sets() -> None:
    assert "_MAX_RECV_BYTES" in _AsyncTransportBase._consume.__code__.co_names
    assert _AsyncTransportBase._MAX_RECV_BYTES == 64 * 1024
