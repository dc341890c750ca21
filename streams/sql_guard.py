"""Read-only SQL for analysts in embedded mode: the check of one SELECT, and its bounded, read-only run.

In embedded mode the engine process owns the chDB directory, so analysts query through it (`POST /api/sql`)
and their SQL runs inside the process that also writes the ledger. Two independent layers keep that safe:

1. `check_read_only_sql` tokenizes the text (string literals, quoted identifiers and comments are
   recognised first, so a keyword inside a string is not a keyword and a comment cannot hide one) and
   accepts exactly one `SELECT` or `WITH ... SELECT` statement without statements, clauses or functions
   that write, change settings, or reach files, URLs, other servers or programs. It returns the statement
   rebuilt from the tokens it checked, with the comments removed, so what runs is exactly what was checked.
2. `run_read_only_sql` runs that statement with a trailing `SETTINGS` clause of its own: the result and
   time limits first, then `readonly = 1`, which makes the engine itself refuse every write, every table
   function that is not read-only-safe and every further settings change in that query.

Measured on chDB 26.9 through clickhouse-connect: `readonly = 1` in a query's SETTINGS clause applies to
that query only. It must come last (after it, the engine refuses to change the limits). `readonly = 2`
still lets `url()` run, so it is not used. The scalar function `file('/path')` is *not* refused by
`readonly = 1`, which is one reason the token check exists. Never pass `readonly` through
clickhouse-connect's `settings=` argument of `command()`: the chDB backend applies such settings with
`SET` and restores them afterwards, and the restore fails once the session is read-only, leaving the
shared client read-only for the ledger sink too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any

__all__ = [
    "RESULT_ROWS_MAX",
    "SQL_LENGTH_MAX",
    "ReadOnlyResult",
    "SqlFailed",
    "SqlRefused",
    "check_read_only_sql",
    "run_read_only_sql",
]

SQL_LENGTH_MAX = 100_000  # characters of one analyst query
RESULT_ROWS_MAX = 10_000  # rows returned to the caller; more are cut off and flagged `truncated`
EXECUTION_TIME_MAX_S = 10  # an analyst query holds the engine's single connection while it runs
RESULT_BYTES_MAX = 64 * 1024 * 1024
MEMORY_USAGE_MAX_BYTES = 2 * 1024 * 1024 * 1024

# Statements and clauses that write, change settings or state, or redirect output. A bare word (not a
# quoted identifier, not inside a string or comment) equal to one of these refuses the query.
FORBIDDEN_KEYWORDS: dict[str, str] = {
    "insert": "INSERT writes data",
    "alter": "ALTER changes a table",
    "drop": "DROP removes a table",
    "create": "CREATE makes a table, view or function",
    "truncate": "TRUNCATE deletes data",
    "delete": "DELETE deletes data",
    "update": "UPDATE changes data",
    "rename": "RENAME changes a table",
    "exchange": "EXCHANGE swaps tables",
    "attach": "ATTACH changes the database",
    "detach": "DETACH changes the database",
    "undrop": "UNDROP changes the database",
    "optimize": "OPTIMIZE rewrites a table",
    "system": "SYSTEM controls the engine",
    "kill": "KILL stops queries",
    "grant": "GRANT changes access rights",
    "revoke": "REVOKE changes access rights",
    "set": "SET changes settings",
    "settings": "a SETTINGS clause changes limits (the API sets them)",
    "use": "USE changes the database",
    "backup": "BACKUP writes files",
    "restore": "RESTORE writes tables",
    "into": "INTO OUTFILE writes files",
    "outfile": "INTO OUTFILE writes files",
    "infile": "FROM INFILE reads files",
}

# Functions (table functions, and the scalar `file`) that read or write files, URLs, object stores, other
# servers or programs. Matched case-insensitively on a name directly followed by `(`: by exact name, or
# by family prefix (s3Cluster, icebergS3, deltaLakeLocal, postgresql, ...).
FORBIDDEN_FUNCTIONS = frozenset(
    {
        "url",
        "urlcluster",
        "cluster",
        "clusterallreplicas",
        "input",
        "gcs",
        "oss",
        "cosn",
        "hive",
        "executable",
        "executablepool",
        "dictionary",
    }
)
FORBIDDEN_FUNCTION_PREFIXES = (
    "file",
    "s3",
    "hdfs",
    "remote",
    "mysql",
    "postgres",
    "jdbc",
    "odbc",
    "azure",
    "deltalake",
    "iceberg",
    "hudi",
    "paimon",
    "sqlite",
    "mongo",
    "redis",
    "arrowflight",
    "ytsaurus",
    "prometheus",
    "catboost",
    "kafka",
)

STATEMENT_STARTS = ("select", "with")


class SqlRefused(ValueError):
    """The text is not one read-only SELECT; `reason` says what was refused (shown to the analyst)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SqlFailed(ValueError):
    """The engine refused or failed the checked query (syntax, unknown table, a limit); `reason` is its message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TokenKind(Enum):
    word = "word"  # keyword or bare identifier
    quoted = "quoted"  # "identifier" or `identifier`
    string = "string"  # 'literal'
    number = "number"
    symbol = "symbol"  # operators and punctuation, one or more characters
    whitespace = "whitespace"


@dataclass(frozen=True)
class Token:
    kind: TokenKind
    text: str  # exactly as written

    @property
    def lowered(self) -> str:
        return self.text.lower()


WORD = re.compile(r"[^\W\d]\w*")
NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|0[bB][01]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?")
WHITESPACE = re.compile(r"\s+")
SYMBOLS = "()[]{},.;:+-*/%<>=!?|^&~@"


def _tokenize(sql: str) -> list[Token]:
    """Split `sql` into tokens, dropping comments. Raises SqlRefused on text the check cannot vouch for."""
    tokens: list[Token] = []
    position = 0
    length = len(sql)
    while position < length:
        char = sql[position]
        if sql.startswith("--", position) or char == "#":
            # Line comments (ClickHouse also reads `#` as one): dropped, replaced by whitespace.
            end = sql.find("\n", position)
            position = length if end < 0 else end
            tokens.append(Token(TokenKind.whitespace, " "))
            continue
        if sql.startswith("/*", position):
            position = _skip_block_comment(sql, position)
            tokens.append(Token(TokenKind.whitespace, " "))
            continue
        if char in "'\"`":
            end = _quoted_end(sql, position, char)
            kind = TokenKind.string if char == "'" else TokenKind.quoted
            tokens.append(Token(kind, sql[position:end]))
            position = end
            continue
        if char == "$":
            raise SqlRefused("`$` is not accepted outside strings (heredoc strings $$...$$ are not supported)")
        for pattern, kind in ((WHITESPACE, TokenKind.whitespace), (WORD, TokenKind.word), (NUMBER, TokenKind.number)):
            match = pattern.match(sql, position)
            if match:
                tokens.append(Token(kind, match.group()))
                position = match.end()
                break
        else:
            if char not in SYMBOLS:
                raise SqlRefused(f"unexpected character {char!r} at position {position}")
            tokens.append(Token(TokenKind.symbol, char))
            position += 1
    return tokens


def _skip_block_comment(sql: str, start: int) -> int:
    """The end of the `/* ... */` comment at `start`. ClickHouse nests block comments, and so does this."""
    depth = 0
    position = start
    while position < len(sql):
        if sql.startswith("/*", position):
            depth += 1
            position += 2
        elif sql.startswith("*/", position):
            depth -= 1
            position += 2
            if depth == 0:
                return position
        else:
            position += 1
    raise SqlRefused("a /* comment is not closed")


def _quoted_end(sql: str, start: int, quote: str) -> int:
    """The end of the quoted string or identifier at `start`: backslash escapes and doubled quotes, as ClickHouse."""
    position = start + 1
    while position < len(sql):
        char = sql[position]
        if char == "\\":
            position += 2
            continue
        if char == quote:
            if sql.startswith(quote, position + 1):
                position += 2
                continue
            return position + 1
        position += 1
    what = "string literal" if quote == "'" else "quoted identifier"
    raise SqlRefused(f"a {what} starting at position {start} is not closed")


def _unquoted(token: Token) -> str:
    return token.text[1:-1].lower()


def _is_forbidden_function(name: str) -> bool:
    return name in FORBIDDEN_FUNCTIONS or name.startswith(FORBIDDEN_FUNCTION_PREFIXES)


def check_read_only_sql(sql: str) -> str:
    """Accept exactly one SELECT (or WITH ... SELECT) statement; return it without comments and without a
    trailing `;`. Raise SqlRefused with the reason otherwise (see the module docstring for what is refused).
    """
    if not isinstance(sql, str):
        raise SqlRefused(f"the query must be a string, got {type(sql).__name__}")
    if len(sql) > SQL_LENGTH_MAX:
        raise SqlRefused(f"the query is longer than {SQL_LENGTH_MAX} characters")
    if "\x00" in sql:
        raise SqlRefused("the query contains a NUL character")
    tokens = _tokenize(sql)
    meaningful = [index for index, token in enumerate(tokens) if token.kind is not TokenKind.whitespace]
    if not meaningful:
        raise SqlRefused("the query is empty")
    semicolons = [index for index in meaningful if tokens[index].text == ";"]
    if semicolons:
        if len(semicolons) > 1 or semicolons[0] != meaningful[-1]:
            raise SqlRefused("only one statement is accepted (a `;` may only end the query)")
        del tokens[semicolons[0] :]
        meaningful = meaningful[:-1]
        if not meaningful:
            raise SqlRefused("the query is empty")
    first = next((tokens[index] for index in meaningful if tokens[index].text != "("), None)
    if first is None or first.kind is not TokenKind.word or first.lowered not in STATEMENT_STARTS:
        shown = first.text[:40] if first is not None else "("
        raise SqlRefused(f"only a SELECT (or WITH ... SELECT) statement is accepted, not {shown!r}")
    for position, index in enumerate(meaningful):
        token = tokens[index]
        before = tokens[meaningful[position - 1]].text if position > 0 else ""
        after = tokens[meaningful[position + 1]].text if position + 1 < len(meaningful) else ""
        calls = after == "("
        # A word next to a dot is part of a qualified name (system.settings, t.format), not a keyword.
        qualified = before == "." or after == "."
        if token.kind is TokenKind.word:
            word = token.lowered
            if word == "format" and not calls and not qualified:
                raise SqlRefused("a FORMAT clause is not accepted: the API returns JSON")
            if word in FORBIDDEN_KEYWORDS and not qualified:
                raise SqlRefused(f"{token.text.upper()} is not accepted: {FORBIDDEN_KEYWORDS[word]}")
            if calls and _is_forbidden_function(word):
                raise SqlRefused(f"the function {token.text}() is not accepted: it reads outside the projections")
        elif token.kind is TokenKind.quoted and calls and _is_forbidden_function(_unquoted(token)):
            raise SqlRefused(f"the function {token.text}() is not accepted: it reads outside the projections")
    return "".join(token.text for token in tokens).strip()


@dataclass(frozen=True)
class ReadOnlyResult:
    columns: list[str]
    rows: list[list[Any]]  # JSON-ready values
    truncated: bool  # more than `rows_max` rows, or more than RESULT_BYTES_MAX of them: the first ones are here


def _limits_clause(rows_max: int, execution_time_max_s: int) -> str:
    # `readonly = 1` last: once it applies, the engine refuses to change any other setting.
    return (
        "SETTINGS "
        f"max_result_rows = {rows_max + 1}, max_result_bytes = {RESULT_BYTES_MAX}, result_overflow_mode = 'break', "
        f"max_execution_time = {execution_time_max_s}, timeout_overflow_mode = 'throw', "
        f"max_memory_usage = {MEMORY_USAGE_MAX_BYTES}, readonly = 1"
    )


def run_read_only_sql(
    client: Any,
    sql: str,
    *,
    rows_max: int = RESULT_ROWS_MAX,
    execution_time_max_s: int = EXECUTION_TIME_MAX_S,
) -> ReadOnlyResult:
    """Check `sql`, run it read-only with the limits, and return at most `rows_max` JSON-ready rows.

    Raises SqlRefused before any I/O when the check refuses it, SqlFailed when the engine does.
    """
    if not 1 <= rows_max <= RESULT_ROWS_MAX:
        raise ValueError(f"rows_max must be in 1..{RESULT_ROWS_MAX}, got {rows_max}")
    if not 1 <= execution_time_max_s <= 600:
        raise ValueError(f"execution_time_max_s must be in 1..600, got {execution_time_max_s}")
    statement = check_read_only_sql(sql)
    from clickhouse_connect.driver.exceptions import ClickHouseError

    try:
        # No `parameters=` and no `settings=`: the text is sent as checked, with our own SETTINGS clause
        # (see the module docstring for why the settings are not passed through clickhouse-connect).
        result = client.query(f"{statement}\n{_limits_clause(rows_max, execution_time_max_s)}")
    except ClickHouseError as error:
        raise SqlFailed(_engine_reason(error)) from None
    rows = result.result_rows
    columns = list(result.column_names)
    if not columns and not rows:  # the chDB backend names no column of an empty result
        try:
            described = client.query(f"DESCRIBE ({statement})\n{_limits_clause(rows_max, execution_time_max_s)}")
            columns = [row[0] for row in described.result_rows]
        except ClickHouseError as error:
            raise SqlFailed(_engine_reason(error)) from None
    answer: list[list[Any]] = []
    size = 0
    for row in rows[:rows_max]:
        converted = [_json_value(value) for value in row]
        # The engine checks max_result_bytes per block (up to 65,536 rows): the answer keeps the bound itself.
        size += len(json.dumps(converted, ensure_ascii=False, default=str).encode())
        if size > RESULT_BYTES_MAX:
            return ReadOnlyResult(columns=columns, rows=answer, truncated=True)
        answer.append(converted)
    return ReadOnlyResult(columns=columns, rows=answer, truncated=len(rows) > rows_max)


def _engine_reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[0] if lines else type(error).__name__
    return reason[:500]


def _json_value(value: Any) -> Any:
    """A ClickHouse value as JSON: numbers and strings as they are, dates ISO 8601, decimals as exact strings,
    non-finite floats as the strings "NaN", "Infinity", "-Infinity", containers element by element."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, Sequence):
        return [_json_value(item) for item in value]
    return str(value)  # UUID, IP addresses, ...
