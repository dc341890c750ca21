-- One row per (year, customer) with that customer's daily earnings of two calendar years: `year` and `year + 1`.
-- It replaces yearly_customer_points (migration 0006, dropped at the end of this file), whose rows held one year:
-- with two, every range of at most 366 days (a month across a year end, a rolling twelve months) lies within one
-- row per customer, so "top earning customers" of any such range is one array-slice sum per row, with no
-- GROUP BY over customers (projections.queries.top_earners). Each day is in two rows: those of its year and of
-- the year before. `days`, `day_points` and `day_entries` are the customer's rows of daily_customer_points in
-- the two years (same index, days ascending): the points earned (kinds earned and confirmed) and the entries on
-- each day with an entry. `points_bound` is the sum of max(day_points, 0) over the days of `year` alone: no sum
-- over days of that year can exceed it, so the top earners of a long range within it can be picked among the
-- customers with the highest bounds and certified exact. After recomputing daily_customer_points for some days,
-- the sink replaces those days in the rows of the customers who have a row on them (never an increment, so a
-- retried batch writes the same rows; projections/sink.py). `entries` (the sum of `day_entries`, which only
-- grows with the ledger) is the version: the newest row has the most entries.
CREATE TABLE IF NOT EXISTS two_year_customer_points
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

-- Existing daily rows: the same rows the sink would compute. Safe to repeat: a second run inserts identical
-- rows, which the table collapses.
INSERT INTO two_year_customer_points (year, customer_id, points_bound, entries, days, day_points, day_entries)
SELECT year, customer_id, sumIf(greatest(points_earned, 0), toYear(day) = year), sum(entries),
       arraySort(groupArray(day)),
       arraySort((points, day_of) -> day_of, groupArray(points_earned), groupArray(day)),
       arraySort((count, day_of) -> day_of, groupArray(entries), groupArray(day))
FROM
(
    SELECT arrayJoin([toUInt16(toYear(day) - 1), toYear(day)]) AS year, customer_id, day, points_earned, entries
    FROM daily_customer_points FINAL
)
GROUP BY year, customer_id
SETTINGS do_not_merge_across_partitions_select_final = 1;

DROP TABLE IF EXISTS yearly_customer_points;
