-- One row per (year, customer) with that customer's daily earnings of the year, for "top earning customers".
-- `days` and `day_points` are the customer's rows of daily_customer_points in that year (same index, days
-- ascending): the points earned (kinds earned and confirmed) on each day with an entry. `points_bound` is
-- the sum of max(day_points, 0): no sum over any range of days of the year can exceed it, so the top
-- earners of a long range can be picked among the few customers with the highest bounds and certified
-- exact (projections.queries.top_earners). The sink recomputes the rows of every customer with an entry
-- on a recomputed day from daily_customer_points FINAL, right after that table (never increments), so a
-- retried batch recomputes the same rows. `entries` (the day rows' entries, which only grow with the
-- ledger) is the version: the newest row of a (year, customer) has the most entries.
CREATE TABLE IF NOT EXISTS yearly_customer_points
(
    year UInt16,
    customer_id String,
    points_bound Int64,
    entries UInt64,
    days Array(Date),
    day_points Array(Int64),
    computed_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(entries)
PARTITION BY year
ORDER BY (year, customer_id);

-- Existing daily rows (a database made before this migration): the same rows the sink would compute.
-- Safe to repeat: a second run inserts identical rows, which the table collapses.
INSERT INTO yearly_customer_points (year, customer_id, points_bound, entries, days, day_points)
SELECT toYear(day) AS year, customer_id, sum(greatest(points_earned, 0)), sum(entries),
       arrayMap(pair -> pair.1, arraySort(groupArray((day, points_earned)))),
       arrayMap(pair -> pair.2, arraySort(groupArray((day, points_earned))))
FROM daily_customer_points FINAL
GROUP BY year, customer_id
SETTINGS do_not_merge_across_partitions_select_final = 1;
