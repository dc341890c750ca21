-- Where the ledger sink resumes: per (topic, partition), the next Kafka offset to read.
-- The sink writes these rows only after the ledger rows (and the daily aggregates) of the same batch, so
-- a crash in between makes the restart re-read and re-insert the tail, which the ledger dedupes by entry id.
-- The version column is next_offset itself: a stale writer can never move a position backwards.
CREATE TABLE IF NOT EXISTS sink_offsets
(
    topic LowCardinality(String),
    partition UInt32,
    next_offset UInt64,
    written_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(next_offset)
ORDER BY (topic, partition);
