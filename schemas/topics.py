"""Kafka topic names of contract v1 and which event types travel on each."""

from __future__ import annotations

PURCHASES = "loyalty.purchases"
REVIEWS = "loyalty.reviews"
REFERRALS = "loyalty.referrals"
ENGAGEMENT = "loyalty.engagement"
REDEMPTIONS = "loyalty.redemptions"
LEDGER = "loyalty.ledger"
DEAD_LETTER = "loyalty.dead-letter"
# Rule-set documents and where each took effect in each input partition (see streams/cutover.py).
RULESETS = "loyalty.rulesets"

# Input topics in their tie-break rank: when two events of one customer carry the same occurred_at,
# the one on the earlier topic here is applied first, in both the stream and the batch driver.
INPUT_TOPICS: tuple[str, ...] = (ENGAGEMENT, PURCHASES, REVIEWS, REFERRALS, REDEMPTIONS)
ALL_TOPICS: tuple[str, ...] = INPUT_TOPICS + (LEDGER, DEAD_LETTER, RULESETS)
TOPIC_RANK: dict[str, int] = {topic: rank for rank, topic in enumerate(INPUT_TOPICS)}

EVENT_TYPE_TOPIC: dict[str, str] = {
    "purchase.completed": PURCHASES,
    "purchase.refunded": PURCHASES,
    "purchase.cancelled": PURCHASES,
    "review.approved": REVIEWS,
    "referral.completed": REFERRALS,
    "referral.reversed": REFERRALS,
    "customer.registered": ENGAGEMENT,
    "blog.commented": ENGAGEMENT,
    "social.shared": ENGAGEMENT,
    "feedback.submitted": ENGAGEMENT,
    "clock.tick": ENGAGEMENT,
    "points.redeem_requested": REDEMPTIONS,
    "points.adjusted": REDEMPTIONS,
}

# Order rank of events the engine derives (referral.reversed): after every input topic, so that a derived event
# follows all of its customer's events of the same instant, in both drivers.
DERIVED_RANK = len(INPUT_TOPICS)

# Lines whose event_type cannot be read are still published, to this topic, so that the worker
# dead-letters them with a reason instead of the producer dropping them silently.
UNROUTABLE_TOPIC = ENGAGEMENT

# Header set on the copy of a referral routed to the referee's partition (see streams/routing.py).
SIDE_HEADER = "loyalty-side"
REFEREE_SIDE = b"referee"
# The same header marks an event the engine derived for another customer (streams/applier.py, `_derive`).
DERIVED_SIDE = b"derived"

# Header of a cut-over marker: a control message (not an event) that switches the partition's rule set.
CONTROL_HEADER = "loyalty-control"
RULESET_CONTROL = b"ruleset"
