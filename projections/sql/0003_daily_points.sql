-- Daily aggregates for the dashboard, recomputed (never incremented) from ledger_entries FINAL for every
-- day a sink batch touched. Recomputing a day from the deduplicated ledger is idempotent, so a retried
-- batch cannot double count. The ledger only grows, so a later recompute of a group always has at least
-- as many entries as an earlier one: `entries` is the ReplacingMergeTree version, and FINAL keeps the
-- newest figures even when two recomputes of the same day race.
-- category uses '' for "none" because sorting key columns cannot be Nullable. The product (sku) is left
-- out on purpose: with thousands of products the table would be nearly as large as the ledger itself.
CREATE TABLE IF NOT EXISTS daily_points
(
    day Date,
    store_id LowCardinality(String),
    kind LowCardinality(String),
    source LowCardinality(String),
    rule_id LowCardinality(String),
    category LowCardinality(String),
    points Int64,
    points_positive Int64,
    pending_points Int64,
    entries UInt64,
    entries_positive UInt64,
    computed_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(entries)
PARTITION BY toYYYYMM(day)
ORDER BY (day, store_id, kind, source, rule_id, category);
