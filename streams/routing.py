"""Which topic, key and headers each raw input line is published with (producer side, no validation)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from kafka.partitioner.default import murmur2

from schemas.topics import EVENT_TYPE_TOPIC, REFEREE_SIDE, REFERRALS, SIDE_HEADER, UNROUTABLE_TOPIC


@dataclass(frozen=True, slots=True)
class Route:
    topic: str
    key: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


def routes_for(raw: bytes, topic: str | None = None) -> list[Route]:
    """Routes for one line. A referral goes out twice: keyed by the referrer, and keyed by the referee
    with the `loyalty-side: referee` header, so each customer's entries are decided on their own partition.
    Lines that cannot be read are still routed (to the engagement topic) so the worker dead-letters them.
    """
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        return [Route(topic or UNROUTABLE_TOPIC, None)]
    customer_id = document.get("customer_id")
    key = customer_id.encode() if isinstance(customer_id, str) and customer_id else None
    event_type = document.get("event_type")
    target = topic or EVENT_TYPE_TOPIC.get(event_type if isinstance(event_type, str) else "", UNROUTABLE_TOPIC)
    routes = [Route(target, key)]
    referee_id = document.get("referee_id")
    if target == REFERRALS and event_type == "referral.completed" and isinstance(referee_id, str) and referee_id:
        routes.append(Route(REFERRALS, referee_id.encode(), ((SIDE_HEADER, REFEREE_SIDE),)))
    return routes


def partition_for(key: bytes, partitions: int) -> int:
    """The partition a keyed message lands on: the Kafka clients' default partitioner (murmur2), which the
    producers use, so a worker can tell which partition holds a customer."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
