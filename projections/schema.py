"""The ClickHouse schema of the projections, applied as numbered, recorded, idempotent migrations.

Each migration is a file `projections/sql/NNNN_name.sql`; `migrate` applies, in order, those whose
version is not yet in `schema_migrations`, and records each version after its statements ran. Every
statement is `CREATE ... IF NOT EXISTS` (or otherwise safe to repeat), so a crash between a migration's
statements and its record only makes the next `migrate` run them again. Never edit a released
migration: add the next number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from clickhouse_connect.driver.client import Client

__all__ = ["Migration", "applied_versions", "migrate", "migrations"]

MIGRATION_FILE_PATTERN = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

SCHEMA_MIGRATIONS_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version UInt32,
    name String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY version
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def migrations() -> tuple[Migration, ...]:
    """Every packaged migration, in version order."""
    found = []
    for resource in resources.files("projections").joinpath("sql").iterdir():
        match = MIGRATION_FILE_PATTERN.match(resource.name)
        if match is None:
            continue
        found.append(
            Migration(
                version=int(match.group(1)),
                name=match.group(2),
                statements=_split_statements(resource.read_text(encoding="utf-8")),
            )
        )
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    assert len(set(versions)) == len(versions), f"two migrations share a version: {versions}"
    return tuple(found)


def applied_versions(client: Client) -> set[int]:
    client.command(SCHEMA_MIGRATIONS_DDL)
    return {row[0] for row in client.query("SELECT DISTINCT version FROM schema_migrations").result_rows}


def migrate(client: Client) -> list[int]:
    """Apply the migrations not applied yet; return their versions (empty when the schema is current)."""
    done = applied_versions(client)
    applied = []
    for migration in migrations():
        if migration.version in done:
            continue
        for statement in migration.statements:
            if _on_distributed_table(client, statement):
                continue  # a cluster's operators alter its local tables (docs/operations.md)
            client.command(statement)
        client.insert("schema_migrations", [[migration.version, migration.name]], column_names=["version", "name"])
        applied.append(migration.version)
    return applied


_ALTER_TABLE = re.compile(r"^ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?`?(\w+)`?\s", re.IGNORECASE)


def _on_distributed_table(client: Client, statement: str) -> bool:
    """Whether `statement` alters a Distributed table: on a cluster the tables of the original names are Distributed
    over `*_local` tables the operators create, and a projection or a table setting belongs on those (ON CLUSTER)."""
    match = _ALTER_TABLE.match(statement)
    if match is None:
        return False
    rows = client.query(
        "SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = {name:String}",
        parameters={"name": match.group(1)},
    ).result_rows
    return bool(rows) and rows[0][0] == "Distributed"


def _split_statements(text: str) -> tuple[str, ...]:
    """The statements of a migration file: `--` comment lines removed, split on `;` at a line end.

    Migration files are ours, so this deliberately simple rule (no `;` at a line end inside a string) is
    enough; it keeps the files plain SQL that an analyst can also paste into clickhouse-client.
    """
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    statements = [part.strip() for part in re.split(r";\s*$", "\n".join(lines), flags=re.MULTILINE)]
    return tuple(statement for statement in statements if statement)
