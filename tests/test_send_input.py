"""`postbote send` reads its input line by line and finds exactly the jobs and errors that
`parse_jobs` finds in the whole text."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from producer import parse_jobs, read_jobs
from schemas.job import Job
from tests.support.services import postbote
from worker.settings import Settings
from worker.testbed.documents import make_job


def line(n: int, **changes: Any) -> str:
    job = make_job("acme", "invoice", n, user_id="u1", to=f"kunde{n}@example.com")
    job.update(changes)
    return json.dumps(job)


FIXED_ID = str(uuid.uuid4())
BROKEN_SUBJECT = line(1, subject="a\nb")
SPACED_OUT = json.dumps(json.loads(line(2)), separators=(" , ", " : "))

INPUTS = {
    "json lines with blank lines and CRLF": f"\n{line(1)}\r\n\r\n{line(2)}\n  \n{line(3)}",
    "one pretty-printed object after blank lines": "\n \n" + json.dumps(json.loads(line(1)), indent=2),
    "only whitespace": " \n\t\n",
    "nothing": "",
    "a schema error before a JSON error": f"{BROKEN_SUBJECT}\n{line(2)}\n{{oops\n",
    "a first line that is not JSON by itself": f"{{\n{line(1)}\n{line(2)}\n",
    "a line that is not an object": f'{line(1)}\n[1, 2]\n"text"\n',
    "the same job id twice": f"{line(1, job_id=FIXED_ID)}\n{line(2, job_id=FIXED_ID)}\n",
    "an escaped lone surrogate": line(1, subject="Rechnung \ud800"),
    "a field named like the JSON error": line(1, json=True),
    "non-ASCII text and a spaced-out line": line(1, subject="Grüße 😀 \u2028") + "\n" + SPACED_OUT,
}


@pytest.mark.parametrize("text", INPUTS.values(), ids=INPUTS.keys())
def test_reading_line_by_line_finds_what_parsing_the_whole_text_finds(text: str) -> None:
    jobs, errors = parse_jobs(text)
    read, read_errors = read_jobs(io.StringIO(text))
    assert read_errors == errors
    assert [job.dump() for job in read] == ([] if errors else [job.dump() for job in jobs])


def test_a_line_the_fast_validator_accepts_is_the_job_the_python_validator_builds() -> None:
    text = line(1, subject='Grüße "x" \\ y', cc=["Kö@Bücher.example"], not_before="2026-01-02T03:04:05+01:00")
    [job], errors = read_jobs(io.StringIO(text))
    assert not errors
    assert job == Job.model_validate(json.loads(text))


def test_invalid_utf8_after_valid_lines_is_reported_for_the_whole_file(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(f"{line(1)}\n{line(2)}\n".encode() + b'{"tenant": "\xff"}\n')
    result = postbote(settings, "send", str(path))
    assert result.returncode == 2
    assert result.stderr == f"postbote: {path} is not UTF-8 text\n"
    assert result.stdout == ""
