-- The rule-set documents `loyalty replay --apply` put in force (the broker's loyalty.rulesets holds them too):
-- kept here so that the topics of a fresh embedded broker can be rebuilt from ClickHouse (streams/restore.py).
CREATE TABLE IF NOT EXISTS rulesets
(
    version String,
    text String,
    recorded_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(recorded_at)
ORDER BY version;
