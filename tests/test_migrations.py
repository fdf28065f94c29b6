"""`postbote db upgrade` is idempotent and records what it applied."""

from __future__ import annotations

from tests.support.services import postbote
from worker.db import Connection, migrations
from worker.settings import Settings


def test_upgrade_applied_every_migration_once(db: Connection) -> None:
    versions = [r["version"] for r in db.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == [m.version for m in migrations()]


def test_upgrading_twice_changes_nothing(settings: Settings) -> None:
    first = postbote(settings, "db", "upgrade")
    second = postbote(settings, "db", "upgrade")
    assert first.returncode == second.returncode == 0
    assert "up to date" in second.stdout


def test_an_unreachable_database_is_a_clear_error(settings: Settings) -> None:
    result = postbote(settings, "db", "upgrade", database_url="postgresql://postgres@127.0.0.1:1/none")
    assert result.returncode == 1
    assert "database unreachable" in result.stderr
    assert "Traceback" not in result.stderr
