"""The exported JSON Schema files match the models (run `make schemas` after changing a model)."""

from __future__ import annotations

from schemas.export import HERE, rendered


def test_the_json_schema_files_are_up_to_date() -> None:
    for name, text in rendered().items():
        assert (HERE / name).read_text(encoding="utf-8") == text, (
            f"schemas/{name} is stale: run `make schemas`"
        )
