"""Turning raw bytes into a typed event, or into an EventRejected error that names the problem."""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter, ValidationError

from schemas import events, topics


class EventRejected(ValueError):
    """Bad input. `reason` is what ends up in the dead-letter record; `field` is its dotted path."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        self.reason = f"{field}: {reason}" if field else reason
        self.field = field
        super().__init__(self.reason)


_any_event: TypeAdapter[events.Event] = TypeAdapter(events.AnyEvent)
_topic_adapters: dict[str, TypeAdapter[Any]] = {
    topics.PURCHASES: TypeAdapter(events.PurchaseEvent),
    topics.REVIEWS: TypeAdapter(events.ReviewEvent),
    topics.REFERRALS: TypeAdapter(events.ReferralEvent),
    topics.ENGAGEMENT: TypeAdapter(events.EngagementEvent),
    topics.REDEMPTIONS: TypeAdapter(events.RedemptionEvent),
}


def _explain(error: ValidationError, topic: str | None) -> EventRejected:
    first = error.errors(include_url=False)[0]
    kind = first["type"]
    location = [str(part) for part in first["loc"]]
    # A discriminated union puts the tag name first in the location; drop it so the path is the
    # field as the producer wrote it (`lines.0.quantity`, not `purchase.completed.lines.0.quantity`).
    if location and location[0] in topics.EVENT_TYPE_TOPIC:
        location = location[1:]
    field = ".".join(location) or None
    if kind == "union_tag_invalid":
        tag = first.get("ctx", {}).get("tag", "?")
        if tag in topics.EVENT_TYPE_TOPIC and topic is not None:
            return EventRejected(
                f"event type {tag!r} does not belong on topic {topic} (it goes to {topics.EVENT_TYPE_TOPIC[tag]})",
                "event_type",
            )
        return EventRejected(f"unknown event type {str(tag)[:60]!r}", "event_type")
    if kind == "union_tag_not_found":
        return EventRejected("missing", "event_type")
    if kind == "json_invalid":
        return EventRejected(f"not valid JSON ({first['msg'].removeprefix('Invalid JSON: ')})")
    if kind in ("model_type", "dict_type") and not location:
        return EventRejected("the event must be a JSON object")
    if kind == "extra_forbidden":
        return EventRejected("unknown field", field)
    if kind == "string_pattern_mismatch" and "x21" in str(first.get("ctx", {}).get("pattern", "")):
        return EventRejected("must be 1 to 128 printable ASCII characters without spaces", field)
    if kind == "bool_type":
        return EventRejected("must be a JSON boolean, true or false", field)
    message = first["msg"]
    message = message.removeprefix("Value error, ")
    return EventRejected(message[:300], field)


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return document


def _repeated_key(raw: bytes | str) -> str | None:
    """The first key that an object of `raw` repeats (JSON parsers keep its last value silently), if any."""
    try:
        json.loads(raw, object_pairs_hook=_refuse_repeated_keys)
    except _RepeatedKey as repeated:
        return repeated.key
    except (ValueError, RecursionError):  # not JSON: the validation below says why
        return None
    return None


def decode_event(raw: bytes | str, topic: str | None = None) -> events.Event:
    """Parse and validate one event. With `topic`, only the event types of that topic are accepted."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > events.payload_size_max_bytes:
        raise EventRejected(f"payload of {size} bytes exceeds the limit of {events.payload_size_max_bytes} bytes")
    # A repeated key keeps its last value in the parser, so `{"event_id": "a", ..., "event_id": "b"}` would be
    # event b. Checking every object for repeated keys doubles the decode time (a second, Python-level parse), so
    # only a payload that names `event_id`, the idempotency key, twice is parsed again to check (docs/events.md),
    # and one with a `\u` escape, which can spell a key another way (`"event\u005fid"`).
    twice = raw.count(b'"event_id"') if isinstance(raw, bytes) else raw.count('"event_id"')
    if twice > 1 or (b"\\u" in raw if isinstance(raw, bytes) else "\\u" in raw):
        repeated = _repeated_key(raw)
        if repeated is not None:
            raise EventRejected(f"the key {repeated[:60]!r} appears twice in one JSON object")
    adapter = _topic_adapters.get(topic, _any_event) if topic is not None else _any_event
    try:
        return adapter.validate_json(raw)
    except ValidationError as error:
        raise _explain(error, topic) from None
    except (ValueError, RecursionError) as error:  # deeply nested JSON, invalid UTF-8
        raise EventRejected(f"not valid JSON ({str(error)[:200]})") from None
