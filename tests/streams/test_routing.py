"""Producer routing: topic by event_type, key by customer, referrals to both customers' partitions."""

from __future__ import annotations

import json

from schemas.topics import ENGAGEMENT, PURCHASES, REDEMPTIONS, REFEREE_SIDE, REFERRALS, SIDE_HEADER
from streams.routing import Route, routes_for


def test_events_are_routed_by_type_and_keyed_by_customer():
    raw = json.dumps({"event_type": "purchase.completed", "customer_id": "c1"}).encode()
    assert routes_for(raw) == [Route(PURCHASES, b"c1")]
    raw = json.dumps({"event_type": "points.redeem_requested", "customer_id": "c2"}).encode()
    assert routes_for(raw) == [Route(REDEMPTIONS, b"c2")]


def test_a_referral_is_published_for_the_referrer_and_for_the_referee():
    raw = json.dumps({"event_type": "referral.completed", "customer_id": "c1", "referee_id": "c9"}).encode()
    assert routes_for(raw) == [
        Route(REFERRALS, b"c1"),
        Route(REFERRALS, b"c9", ((SIDE_HEADER, REFEREE_SIDE),)),
    ]


def test_unreadable_lines_are_still_published_so_the_worker_dead_letters_them():
    assert routes_for(b"{not json") == [Route(ENGAGEMENT, None)]
    assert routes_for(b'{"event_type": "nope", "customer_id": "c1"}') == [Route(ENGAGEMENT, b"c1")]
    assert routes_for(b"[1, 2]", topic=PURCHASES) == [Route(PURCHASES, None)]
