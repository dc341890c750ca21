"""ClickHouse projections of the ledger: the schema, the idempotent ledger sink, and the read queries.

Depends on `schemas/` only; the caller passes the DSN, the settings and the batches.
"""

from projections.client import connect
from projections.schema import migrate
from projections.sink import IdempotencyConflict, LedgerSink, PreparedJson

__all__ = ["IdempotencyConflict", "LedgerSink", "PreparedJson", "connect", "migrate"]
