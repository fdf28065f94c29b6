"""The document-send job an ERP module publishes."""

from __future__ import annotations

import binascii
import re
from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID, uuid4

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from schemas.constants import DEFAULT_MAX_JOB_BYTES
from schemas.fields import Address, HeaderText, Identifier, Text

_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_MIME_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")


class DocumentType(StrEnum):
    OFFER = "offer"
    ORDER = "order"
    INVOICE = "invoice"
    DUNNING = "dunning"
    RECEIPT = "receipt"
    OTHER = "other"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Document(_Model):
    type: DocumentType
    number: Annotated[HeaderText, Field(min_length=1, max_length=128)]


class Body(_Model):
    text: Text
    html: Text | None = None


class Attachment(_Model):
    filename: Annotated[HeaderText, Field(min_length=1, max_length=255)]
    content_type: Annotated[str, Field(max_length=127)] = "application/octet-stream"
    content_base64: str

    @field_validator("filename")
    @classmethod
    def _plain_filename(cls, value: str) -> str:
        if "/" in value or "\\" in value:
            raise ValueError("must be a file name without a directory")
        return value

    @field_validator("content_type")
    @classmethod
    def _mime_type(cls, value: str) -> str:
        if not _MIME_TYPE.match(value):
            raise ValueError(f"{value!r} is not a MIME type like 'application/pdf'")
        return value.lower()

    @field_validator("content_base64")
    @classmethod
    def _base64(cls, value: str) -> str:
        if not is_base64(value):
            raise ValueError(
                "is not valid base64: only A-Z, a-z, 0-9, '+' and '/', no line breaks,"
                " padded with '=' to a multiple of 4 characters"
            )
        return value

    @property
    def size(self) -> int:
        """Decoded size in bytes."""
        data = self.content_base64
        return len(data) * 3 // 4 - data[-2:].count("=")

    def content(self) -> bytes:
        return binascii.a2b_base64(self.content_base64)


def is_base64(value: str) -> bool:
    """Whether ``value`` is base64 as RFC 4648 section 4 writes it, checked without decoding it:
    what ``binascii.a2b_base64(value, strict_mode=True)`` accepts, except surplus ``=`` after
    the last group of four, which that also takes."""
    if len(value) % 4 or not value.isascii():
        return False
    padding = value.encode("ascii").translate(None, _BASE64_ALPHABET)
    return not padding or (padding in (b"=", b"==") and value.endswith(padding.decode()))


class Job(_Model):
    """One document to send. ``job_id`` is the idempotency key."""

    job_id: UUID = Field(default_factory=uuid4)
    tenant: Identifier
    document: Document
    user_id: Identifier
    clerk_id: Identifier | None = None
    from_: Address | None = Field(None, alias="from")
    to: Annotated[list[Address], Field(min_length=1, max_length=100)]
    cc: Annotated[list[Address], Field(max_length=100)] = []
    bcc: Annotated[list[Address], Field(max_length=100)] = []
    reply_to: Address | None = None
    subject: Annotated[HeaderText, Field(max_length=998)]
    body: Body
    attachments: Annotated[list[Attachment], Field(max_length=100)] = []
    not_before: AwareDatetime | None = None
    """Not sent before this time (ISO 8601 with offset): the job waits, ``scheduled``."""
    expires_at: AwareDatetime | None = None
    """Not sent after this time: a job still unsent then ends ``expired``."""

    @model_validator(mode="after")
    def _size_limit(self, info: ValidationInfo) -> Job:
        context: dict[str, Any] = info.context or {}
        limit = int(context.get("max_job_bytes", DEFAULT_MAX_JOB_BYTES))
        size = len(self.body.text.encode()) + len((self.body.html or "").encode())
        size += sum(a.size for a in self.attachments)
        if size > limit:
            raise ValueError(f"job is {size} bytes, more than the limit of {limit} bytes")
        return self

    def dump(self) -> dict[str, Any]:
        """The job as JSON-compatible data, ``from`` spelled as on the wire."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def dump_json(self) -> bytes:
        """The job as UTF-8 JSON, the same document as :meth:`dump`."""
        return self.__pydantic_serializer__.to_json(self, by_alias=True, exclude_none=True)


__all__ = ["Attachment", "Body", "Document", "DocumentType", "Job"]
