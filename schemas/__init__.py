"""The job, tenant and event models: the contract between ERP modules and postbote.

The models are imported on first use, so a program that needs one of them (``postbote send``
needs only the job) does not pay for loading the others."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.event import Event
    from schemas.job import Attachment, Body, Document, DocumentType, Job
    from schemas.tenant import (
        Dkim,
        DkimKey,
        DkimNextKey,
        Employee,
        Group,
        Senders,
        Series,
        Smtp,
        Tenant,
        TenantFile,
    )

_MODULES = {
    "Event": "schemas.event",
    **dict.fromkeys(("Attachment", "Body", "Document", "DocumentType", "Job"), "schemas.job"),
    **dict.fromkeys(
        (
            "Dkim",
            "DkimKey",
            "DkimNextKey",
            "Employee",
            "Group",
            "Senders",
            "Series",
            "Smtp",
            "Tenant",
            "TenantFile",
        ),
        "schemas.tenant",
    ),
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'schemas' has no attribute {name!r}")
    return getattr(import_module(module), name)


__all__ = [
    "Attachment",
    "Body",
    "Dkim",
    "DkimKey",
    "DkimNextKey",
    "Document",
    "DocumentType",
    "Employee",
    "Event",
    "Group",
    "Job",
    "Senders",
    "Series",
    "Smtp",
    "Tenant",
    "TenantFile",
]
