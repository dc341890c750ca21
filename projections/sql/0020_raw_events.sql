-- The raw archive: every input message as received, with its topic, partition and offset, so that history
-- outlives Kafka's retention and can be replayed under a new rule set. Undecodable messages are kept too
-- (a replay rejects them again, exactly as the worker did). Re-archiving a message is harmless: the key is
-- (topic, partition, offset). Replay reads it per customer in event-time order: (routing_key, occurred_at,
-- topic_rank, offset), the order the worker applies events in.
CREATE TABLE IF NOT EXISTS raw_events
(
    topic LowCardinality(String),
    partition UInt32,
    offset UInt64,
    routing_key String,
    value String,
    referee_side UInt8,
    topic_rank UInt8,
    event_id String,
    occurred_at DateTime64(6, 'UTC'),
    archived_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (topic, partition, offset);
