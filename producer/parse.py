"""Jobs from text: one JSON object, or JSON lines, every line validated, errors naming line and field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain
from typing import Any, TextIO
from uuid import UUID

from pydantic import ValidationError

from schemas.constants import DEFAULT_MAX_JOB_BYTES
from schemas.job import Job


@dataclass(frozen=True)
class InvalidLine:
    """One invalid input line: where, which field, what is wrong."""

    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"


def parse_jobs(
    text: str, *, max_job_bytes: int = DEFAULT_MAX_JOB_BYTES
) -> tuple[list[Job], list[InvalidLine]]:
    """Parse one JSON object or JSON lines; every line is validated before anything is published."""
    stripped = text.strip()
    if not stripped:
        return [], [InvalidLine(1, "input", "no job given")]
    lines = _Lines(max_job_bytes, keep_jobs=True)
    if stripped.startswith("{") and "\n" in stripped:
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            pass
        else:
            lines.add_data(1, data)
            return lines.result()
    # JSON lines end in LF (CRLF tolerated); str.splitlines() would also split inside a JSON
    # string at U+2028, U+0085 and other line breaks JSON allows unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        lines.add(number, line)
    return lines.result()


def read_jobs(
    stream: TextIO, *, max_job_bytes: int = DEFAULT_MAX_JOB_BYTES
) -> tuple[list[Job], list[InvalidLine]]:
    """``parse_jobs(stream.read())``, without holding the text: JSON lines are validated as they
    are read. Once a line is invalid, only the errors are kept: the jobs come back empty."""
    head: list[str] = []
    for line in stream:
        head.append(line)
        if not line.isspace():
            break
    if not head or head[-1].isspace() or not _is_json(head[-1]):
        # Blank, or a first line that is no JSON by itself: perhaps one pretty-printed object,
        # which only the whole text tells apart from JSON lines.
        jobs, errors = parse_jobs("".join(head) + stream.read(), max_job_bytes=max_job_bytes)
        return ([] if errors else jobs), errors
    lines = _Lines(max_job_bytes, keep_jobs=False)
    for number, line in enumerate(chain(head, stream), start=1):
        lines.add(number, line)
    return lines.result()


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


class _Lines:
    """Validates numbered lines (with or without their line end) and collects jobs and errors:
    JSON errors first, then the others, each kind in line order."""

    def __init__(self, max_job_bytes: int, *, keep_jobs: bool) -> None:
        self.context = {"max_job_bytes": max_job_bytes}
        self.keep_jobs = keep_jobs
        self.jobs: list[Job] = []
        self.json_errors: list[InvalidLine] = []
        self.invalid: list[InvalidLine] = []
        self.seen: dict[UUID, int] = {}

    def result(self) -> tuple[list[Job], list[InvalidLine]]:
        return self.jobs, self.json_errors + self.invalid

    def add(self, number: int, line: str) -> None:
        if not line or line.isspace():
            return
        try:
            job = Job.model_validate_json(line, context=self.context)
        except ValidationError:
            # The JSON parser words its errors otherwise; json.loads and the Python validator
            # give the messages postbote has always given.
            self.add_text(number, line.removesuffix("\n"))
            return
        self.add_job(number, job)

    def add_text(self, number: int, line: str) -> None:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            self.refuse(self.json_errors, number, "json", f"not valid JSON ({e.msg} at column {e.colno})")
            return
        self.add_data(number, data)

    def add_data(self, number: int, data: Any) -> None:
        if not isinstance(data, dict):
            self.refuse(self.invalid, number, "job", "must be a JSON object")
            return
        try:
            job = Job.model_validate(data, context=self.context)
        except ValidationError as e:
            for item in e.errors():
                where = ".".join(str(p) for p in item["loc"]) or "job"
                self.refuse(self.invalid, number, where, item["msg"])
            return
        self.add_job(number, job)

    def add_job(self, number: int, job: Job) -> None:
        if job.job_id in self.seen:
            self.refuse(self.invalid, number, "job_id", f"same job id as line {self.seen[job.job_id]}")
            return
        self.seen[job.job_id] = number
        if self.keep_jobs or not (self.json_errors or self.invalid):
            self.jobs.append(job)

    def refuse(self, errors: list[InvalidLine], number: int, field: str, message: str) -> None:
        errors.append(InvalidLine(number, field, message))
        if not self.keep_jobs:
            self.jobs.clear()


__all__ = ["InvalidLine", "parse_jobs", "read_jobs"]
