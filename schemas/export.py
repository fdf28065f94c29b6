"""Write the JSON Schema files of the job, the tenant file and the delivery event (``python -m schemas.export``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.event import Event
from schemas.job import Job
from schemas.tenant import TenantFile

HERE = Path(__file__).resolve().parent
FILES: dict[str, type[BaseModel]] = {
    "job.schema.json": Job,
    "tenant-file.schema.json": TenantFile,
    "event.schema.json": Event,
}


def rendered() -> dict[str, str]:
    """The schema files' content as they should be."""
    out = {}
    for name, model in FILES.items():
        schema: dict[str, Any] = model.model_json_schema(by_alias=True, mode="validation")
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": name, **schema}
        out[name] = json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return out


def main() -> int:
    for name, text in rendered().items():
        (HERE / name).write_text(text, encoding="utf-8")
        print(f"wrote schemas/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
