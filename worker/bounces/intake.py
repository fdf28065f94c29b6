"""Reports as bytes from where a local MTA or an operator puts them: one message file, a Maildir
(``new/`` and ``cur/``, read in place), a directory of message files, or standard input.

Nothing here moves, flags or deletes a file: what matched nothing stays exactly as it was.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path


def read_messages(source: str) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of each message at ``source`` (``-`` for standard input).

    Raises ``FileNotFoundError`` when ``source`` does not exist.
    """
    if source == "-":
        yield "stdin", sys.stdin.buffer.read()
        return
    path = Path(source)
    if path.is_file():
        yield str(path), path.read_bytes()
        return
    if not path.is_dir():
        raise FileNotFoundError(source)
    folders = [path / "new", path / "cur"] if (path / "cur").is_dir() else [path]
    for folder in folders:
        for file in sorted(folder.iterdir()):
            if file.is_file() and not file.name.startswith("."):
                yield str(file), file.read_bytes()


__all__ = ["read_messages"]
