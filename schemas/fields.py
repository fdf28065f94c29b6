"""Field types shared by the job and tenant models."""

from __future__ import annotations

import re
from typing import Annotated

from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, Field

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _no_control_characters(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain line breaks or control characters")
    return _no_surrogates(value)


def _no_surrogates(value: str) -> str:
    if _SURROGATE.search(value):
        raise ValueError("must not contain unpaired surrogates (\\ud800-\\udfff): not valid Unicode text")
    return value


def _address(value: str) -> str:
    _no_control_characters(value)
    if value != value.strip():
        raise ValueError("must not have leading or trailing spaces")
    try:
        checked = validate_email(value, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as e:
        raise ValueError(f"{value!r} is not a valid e-mail address: {e}") from None
    return checked.normalized


HeaderText = Annotated[str, AfterValidator(_no_control_characters)]
"""Text that ends up in a mail header: no CR, LF or other control characters."""

Text = Annotated[str, AfterValidator(_no_surrogates)]
"""Any text that ends up in a mail: valid Unicode (JSON allows unpaired surrogates; UTF-8 does not)."""

Address = Annotated[
    str, Field(max_length=254, json_schema_extra={"format": "email"}), AfterValidator(_address)
]
"""A bare e-mail address (``local@domain``); no display names, comments or lists."""

Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")]
"""An id of a tenant, employee or group as the ERP knows it."""

__all__ = ["Address", "HeaderText", "Identifier", "Text"]
