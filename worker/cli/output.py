"""Small helpers for what commands print."""

from __future__ import annotations

import json
import sys
from typing import Any


def fail(message: str, *, code: int = 1) -> int:
    """Print ``postbote: message`` to stderr and return ``code``."""
    print(f"postbote: {message}", file=sys.stderr)
    return code


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))
