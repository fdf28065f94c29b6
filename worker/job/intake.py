"""The job path's first stage: a message's argument validated again as a job, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from typing import Any
from uuid import UUID, uuid5

from pydantic import ValidationError

from schemas.job import Job
from worker.errors import InvalidJob
from worker.vocabulary import Reason


def read_job(
    args: tuple[Any, ...], kwargs: dict[str, Any], *, message_id: str, max_job_bytes: int
) -> tuple[Job, dict[str, Any]]:
    """The job a message carries, and its data as published.

    A job without ``job_id`` takes one from the broker message id, which stays the same
    across redeliveries, so the ledger still sends it once (see :func:`job_id_for`).

    Raises:
      InvalidJob: (reason ``not_a_job``) the message does not carry exactly one argument,
        or (``invalid_job``) that argument is not a valid job; the message names the fields.
    """
    if len(args) != 1 or kwargs:
        problem = f"expected one job argument, got {len(args)} and {len(kwargs)} keyword arguments"
        raise InvalidJob(f"not a postbote job message: {problem}", reason=Reason.NOT_A_JOB)
    data = args[0]
    if isinstance(data, dict) and "job_id" not in data:
        data = {**data, "job_id": str(job_id_for(message_id))}
    try:
        return Job.model_validate(data, context={"max_job_bytes": max_job_bytes}), data
    except ValidationError as e:
        raise InvalidJob(_validation_summary(e)) from None


def payload_digest(data: dict[str, Any]) -> str:
    """Fingerprint of a job's content: the same job id with another payload is a conflict.

    Independent of key order (a replayed job comes back from a jsonb column). Attachment
    contents are hashed as they are instead of going through the JSON encoder.
    """
    attachments = data.get("attachments")
    contents: list[bytes] = []
    if isinstance(attachments, list) and all(isinstance(a, dict) for a in attachments):
        contents = [str(a.get("content_base64", "")).encode() for a in attachments]
        data = {
            **data,
            "attachments": [{k: v for k, v in a.items() if k != "content_base64"} for a in attachments],
        }
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
    for content in contents:
        digest.update(b"\0" + content)
    return digest.hexdigest()


def job_id_for(message_id: str) -> UUID:
    """The job id of a message whose job has none: the message id itself when it is a UUID,
    otherwise a UUID derived from it (name-based, so every delivery gets the same)."""
    try:
        return UUID(message_id)
    except ValueError:
        return uuid5(_MESSAGE_IDS, message_id)


_MESSAGE_IDS = UUID("6c1c8a5e-3f0b-4c7e-9a51-2d0f6b1e7a90")
"""Namespace of job ids derived from broker message ids."""


def job_id_of(data: Any) -> UUID | None:
    """The job id of data that is no valid job, where it has a readable one."""
    try:
        return UUID(str(data["job_id"])) if isinstance(data, dict) and "job_id" in data else None
    except ValueError:
        return None


def tenant_of(data: Any) -> str | None:
    tenant = data.get("tenant") if isinstance(data, dict) else None
    return tenant if isinstance(tenant, str) else None


def _validation_summary(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "job"
        parts.append(f"{where}: {item['msg']}")
    return "invalid job: " + "; ".join(parts)


__all__ = ["job_id_for", "job_id_of", "payload_digest", "read_job", "tenant_of"]
