-- One row per (year, customer) with that customer's daily earnings of the year, for "top earning customers".
-- `days`, `day_points` and `day_entries` are the customer's rows of daily_customer_points in that year (same
-- index, days ascending): the points earned (kinds earned and confirmed) and the entries on each day with an
-- entry. `points_bound` is the sum of max(day_points, 0): no sum over any range of days of the year can
-- exceed it, so the top earners of a long range can be picked among the few customers with the highest
-- bounds and certified exact (projections.queries.top_earners). After recomputing daily_customer_points for
-- some days, the sink replaces those days in the rows of the customers who have a row on them (never an
-- increment, so a retried batch writes the same rows; projections/sink.py). `entries` (the sum of
-- `day_entries`, which only grows with the ledger) is the version: the newest row has the most entries.
CREATE TABLE IF NOT EXISTS yearly_customer_points
(
    year UInt16,
    customer_id String,
    points_bound Int64,
    entries UInt64,
    days Array(Date),
    day_points Array(Int64),
    day_entries Array(UInt64),
    computed_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(entries)
PARTITION BY year
ORDER BY (year, customer_id);

-- Existing daily rows (a database made before this migration): the same rows the sink would compute.
-- Safe to repeat: a second run inserts identical rows, which the table collapses.
INSERT INTO yearly_customer_points (year, customer_id, points_bound, entries, days, day_points, day_entries)
SELECT toYear(day) AS year, customer_id, sum(greatest(points_earned, 0)), sum(entries),
       arraySort(groupArray(day)),
       arraySort((points, day_of) -> day_of, groupArray(points_earned), groupArray(day)),
       arraySort((count, day_of) -> day_of, groupArray(entries), groupArray(day))
FROM daily_customer_points FINAL
GROUP BY year, customer_id
SETTINGS do_not_merge_across_partitions_select_final = 1;
