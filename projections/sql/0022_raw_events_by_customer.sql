-- Replay reads the archive per customer: (routing_key, occurred_at, topic_rank, offset). The table is ordered by
-- (topic, partition, offset), its identity, so that order was a sort of the whole archive, held in memory: a replay's
-- memory grew with the archive (docs/performance.md, "Replay memory"). This projection keeps a copy ordered per
-- customer, which replay reads in slices of whole customers (projections/archive.py, `stream_for_replay`), each a range
-- of its primary key. It doubles the archive's disk. A ReplacingMergeTree keeps a projection only when told what to do
-- with it when a merge removes duplicates: rebuild it.
ALTER TABLE raw_events MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild';
ALTER TABLE raw_events ADD PROJECTION IF NOT EXISTS by_customer
(
    SELECT * ORDER BY routing_key, occurred_at, topic_rank, offset
);
ALTER TABLE raw_events MATERIALIZE PROJECTION by_customer SETTINGS mutations_sync = 2;
