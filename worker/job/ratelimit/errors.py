"""What a limiter raises instead of waiting too long."""

from __future__ import annotations

from worker.errors import PostboteError


class Throttled(PostboteError):
    """The tenant's series limit allows no slot within ``max_wait_ms``.

    Not a failure: the caller defers the job by ``retry_in_ms`` without
    counting a retry.
    """

    reason = "throttled"

    def __init__(self, tenant_id: str, retry_in_ms: int) -> None:
        super().__init__(f"tenant {tenant_id!r} is throttled; retry in {retry_in_ms} ms")
        self.tenant_id = tenant_id
        self.retry_in_ms = retry_in_ms


__all__ = ["Throttled"]
