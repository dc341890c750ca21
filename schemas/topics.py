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
# Header of a derived event's published copy: the version of the rule set that decided its cause (the event it was
# derived from). A worker that reads the copy after a cut-over marker of another rule set knows its cause is history
# before the markers, which the apply's compensation covers (streams/applier.py, `_decide_derived`).
CAUSE_RULESET_HEADER = "loyalty-cause-ruleset"

# Header of a cut-over marker: a control message (not an event) that switches the partition's rule set.
CONTROL_HEADER = "loyalty-control"
RULESET_CONTROL = b"ruleset"
# Header of the marker an apply writes into every partition of the compensations' topic after its compensations
# (value = JSON: the version and the apply's cut-over offsets of that partition number, `streams.cutover.end_marker`):
# the worker holds the events after a cut-over marker until it has applied the compensations before the end marker
# that names it (streams/applier.py, "Held for the compensations").
COMPENSATED_CONTROL = b"compensated"
# Header of an apply's plan, written into every partition of the compensations' topic before its compensations
# (value = JSON: the version, the cut-over offsets of that partition number, and the customers of that partition the
# apply compensates, with how many compensation messages each gets; in parts, `streams.cutover.plan_records`): once
# the worker has read every part, the events of the other customers stop waiting, and a customer's own events wait only
# for that customer's compensations, a referrer's for the end marker (streams/applier.py, "Held for the compensations").
PLAN_CONTROL = b"plan"

# The archive's `referee_side` column (projections/archive.py) codes which of these headers an archived input
# message carried: the projector writes the code, the restore gives the message its header back.
ARCHIVE_SIDE_HEADERS: dict[int, tuple[tuple[str, bytes], ...]] = {
    0: (),
    1: ((SIDE_HEADER, REFEREE_SIDE),),
    2: ((CONTROL_HEADER, RULESET_CONTROL),),
    3: ((SIDE_HEADER, DERIVED_SIDE),),
    4: ((CONTROL_HEADER, COMPENSATED_CONTROL),),
    5: ((CONTROL_HEADER, PLAN_CONTROL),),
}


def archive_side(headers) -> int:
    """The archive's side code of an input message's headers, a sequence of (name, bytes) pairs."""
    for side in (2, 4, 5, 3, 1):  # a marker, an apply's end and plan, a derived event, a referee copy; else 0
        if ARCHIVE_SIDE_HEADERS[side][0] in headers:
            return side
    return 0
