"""The job, tenant and event models: the contract between ERP modules and postbote."""

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
