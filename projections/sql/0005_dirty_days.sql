-- Days whose daily aggregates (daily_points, daily_product_points, daily_customer_points) are behind the
-- ledger. A sink that defers the recompute (the projector while it drains a backlog) marks every day a
-- batch touched (dirty = 1) before it stores that batch's offsets, and marks it clean (dirty = 0) after
-- recomputing it. The newest row per day wins (version: nanoseconds of the sink's clock), so a day marked
-- again after a recompute started stays dirty. A crash between the two leaves the day dirty, and the next
-- projector recomputes it when it starts.
CREATE TABLE IF NOT EXISTS dirty_days
(
    day Date,
    dirty UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY day;
