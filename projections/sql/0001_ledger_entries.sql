-- The ledger as written by the sink: one row per ledger entry, every field of schemas.ledger.LedgerEntry.
-- ReplacingMergeTree collapses rows with the same sorting key. The key ends with entry_id, and an entry id
-- always carries the same content (customer, sequence, occurred_at), so a re-inserted entry collapses with
-- its first copy: read with FINAL (or GROUP BY entry_id) for exact sums before background merges run.
-- ORDER BY starts with customer_id so a customer's history is one contiguous range of the primary index;
-- monthly partitions let date-range scans skip whole months. A duplicate has the same occurred_at, so it
-- always lands in the same partition as its first copy (merges dedupe within a partition only).
-- amount keeps the exact decimal string of the entry (cast with toDecimal128OrNull(amount, 6) to compute).
CREATE TABLE IF NOT EXISTS ledger_entries
(
    entry_id String,
    customer_id String,
    store_id LowCardinality(String),
    kind LowCardinality(String),
    sequence UInt64,
    points Int64,
    balance_after Int64,
    pending_points Int64,
    pending_after Int64,
    source LowCardinality(String),
    rule_id LowCardinality(String),
    ruleset_version LowCardinality(String),
    caused_by String,
    event_type LowCardinality(String),
    fingerprint String,
    occurred_at DateTime64(6, 'UTC'),
    order_id Nullable(String),
    sku LowCardinality(Nullable(String)),
    category LowCardinality(Nullable(String)),
    quantity Nullable(Int64),
    amount Nullable(String),
    reference Nullable(String),
    available_at Nullable(DateTime64(6, 'UTC')),
    explanation String,
    schema_version UInt8,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (customer_id, sequence, entry_id);
