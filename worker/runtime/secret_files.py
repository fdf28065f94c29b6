"""What a tenant's settings may reach on a worker host: files inside the secrets directory only,
token commands only by the names the operator configured.

A tenant file is one tenant administrator's input. Every ``*_file`` path in it must resolve,
symbolic links followed, inside ``POSTBOTE_SECRETS_DIR`` (``{tenant}`` in it stands for the
tenant's id, giving each tenant a directory of its own); a relative path is taken relative to
that directory. ``token_command`` is no tenant-file key: ``token_helper`` names one of the
operator's ``POSTBOTE_TOKEN_HELPERS``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FILE_SUFFIX = "_file"
TOKEN_HELPER = "token_helper"
_RETIRED = {
    "token_command": "token_command is not a tenant-file key: the operator names token commands in"
    " POSTBOTE_TOKEN_HELPERS, and the tenant refers to one with token_helper",
}


class ReferenceRefused(ValueError):
    """A tenant's setting reaches where it may not; the message names the field."""


def secrets_root(secrets_dir: str | None, tenant: str) -> Path | None:
    """The directory ``tenant``'s files must be in (symbolic links resolved); ``None`` when no
    secrets directory is configured."""
    if not secrets_dir:
        return None
    return Path(os.path.realpath(secrets_dir.replace("{tenant}", tenant)))


def confine(value: str | Path, *, field: str, tenant: str, secrets_dir: str | None) -> Path:
    """The real path of ``value`` when it lies inside ``tenant``'s secrets directory.

    Raises:
      ReferenceRefused: no secrets directory is configured, or the path (after ``..`` and
        symbolic links) lies outside it.
    """
    root = secrets_root(secrets_dir, tenant)
    if root is None:
        raise ReferenceRefused(
            f"{field}: files are read only from the secrets directory, and POSTBOTE_SECRETS_DIR is not set"
        )
    path = Path(value)
    real = Path(os.path.realpath(root / path if not path.is_absolute() else path))
    if real != root and root not in real.parents:
        raise ReferenceRefused(
            f"{field}: {value} is outside the secrets directory {root} of tenant {tenant!r}"
        )
    return real


def refused_references(
    data: Any, *, tenant: str, secrets_dir: str | None, token_helpers: dict[str, str], where: str = ""
) -> list[str]:
    """Every problem of ``data`` (a tenant's settings as JSON data), each naming its field."""
    problems: list[str] = []
    if isinstance(data, list):
        for i, item in enumerate(data):
            problems += refused_references(
                item,
                tenant=tenant,
                secrets_dir=secrets_dir,
                token_helpers=token_helpers,
                where=f"{where}[{i}]",
            )
        return problems
    if not isinstance(data, dict):
        return problems
    for key, value in data.items():
        field = f"{where}.{key}" if where else key
        if key in _RETIRED and value is not None:
            problems.append(f"{field}: {_RETIRED[key]}")
        elif key.endswith(FILE_SUFFIX) and isinstance(value, str):
            try:
                confine(value, field=field, tenant=tenant, secrets_dir=secrets_dir)
            except ReferenceRefused as e:
                problems.append(str(e))
        elif key == TOKEN_HELPER and isinstance(value, str) and value not in token_helpers:
            known = ", ".join(sorted(token_helpers)) or "none are configured"
            problems.append(
                f"{field}: {value!r} is not one of the operator's POSTBOTE_TOKEN_HELPERS ({known})"
            )
        else:
            problems += refused_references(
                value, tenant=tenant, secrets_dir=secrets_dir, token_helpers=token_helpers, where=field
            )
    return problems


def confine_files(data: Any, *, tenant: str, secrets_dir: str | None, where: str = "") -> Any:
    """``data`` as stored with every ``*_file`` path replaced by its real path, checked again on
    this host (the file system may have changed since the tenant was applied).

    Raises:
      ReferenceRefused: a path is outside the tenant's secrets directory.
    """
    if isinstance(data, list):
        return [
            confine_files(v, tenant=tenant, secrets_dir=secrets_dir, where=f"{where}[{i}]")
            for i, v in enumerate(data)
        ]
    if not isinstance(data, dict):
        return data
    result: dict[str, Any] = {}
    for key, value in data.items():
        field = f"{where}.{key}" if where else key
        if key.endswith(FILE_SUFFIX) and isinstance(value, str):
            result[key] = str(confine(value, field=field, tenant=tenant, secrets_dir=secrets_dir))
        else:
            result[key] = confine_files(value, tenant=tenant, secrets_dir=secrets_dir, where=field)
    return result


__all__ = ["ReferenceRefused", "confine", "confine_files", "refused_references", "secrets_root"]
