"""Compact event notation for rule tests: a short dict becomes a full contract-v1 event JSON object."""

from __future__ import annotations

import copy
from typing import Any

DEFAULT_AT = "2026-03-02T10:00:00+00:00"  # a Monday

# Everything off except 1 point per currency unit, floor rounding, UTC.
BASE_RULESET: dict[str, Any] = {
    "version": "spec-1",
    "timezone": "UTC",
    "rounding": "floor",
    "purchase": {"points_per_unit": "1"},
}

EVENT_TYPES = {
    "purchase": "purchase.completed",
    "refund": "purchase.refunded",
    "cancel": "purchase.cancelled",
    "review": "review.approved",
    "referral": "referral.completed",
    "register": "customer.registered",
    "comment": "blog.commented",
    "share": "social.shared",
    "feedback": "feedback.submitted",
    "tick": "clock.tick",
    "redeem": "points.redeem_requested",
    "adjust": "points.adjusted",
}


def merge_rules(base: dict[str, Any], fragment: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_rules(merged[key], value)
        else:
            merged[key] = value
    return merged


def event_document(compact: dict[str, Any], position: int) -> dict[str, Any]:
    """A full event JSON object from a compact one: envelope and per-type defaults filled in."""
    fields = dict(compact)
    event_type = EVENT_TYPES[fields.pop("type")]
    event_id = str(fields.pop("id", f"e{position}"))
    document: dict[str, Any] = {
        "event_id": event_id,
        "event_type": event_type,
        "schema_version": 1,
        "occurred_at": fields.pop("at", DEFAULT_AT),
        "customer_id": fields.pop("customer", "c1"),
        "store_id": fields.pop("store", "s1"),
    }
    if event_type == "purchase.completed":
        document["order_id"] = fields.pop("order", f"o-{event_id}")
        document["currency"] = fields.pop("currency", "EUR")
        document["lines"] = [
            {"sku": sku, "category": category, "quantity": quantity, "unit_price": str(price)}
            for sku, category, quantity, price in fields.pop("lines")
        ]
    elif event_type == "purchase.refunded":
        document["order_id"] = fields.pop("order")
        document["refund_id"] = fields.pop("refund", f"r-{event_id}")
        if "lines" in fields:
            document["lines"] = [{"sku": sku, "quantity": quantity} for sku, quantity in fields.pop("lines")]
    elif event_type == "purchase.cancelled":
        document["order_id"] = fields.pop("order")
    elif event_type == "review.approved":
        document.update(review_id=fields.pop("review", f"rv-{event_id}"), sku=fields.pop("sku"))
        document["rating"] = fields.pop("rating", 5)
    elif event_type == "referral.completed":
        document.update(referral_id=fields.pop("referral", f"rf-{event_id}"), referee_id=fields.pop("referee"))
        document["order_id"] = fields.pop("order", f"o-{event_id}")
    elif event_type == "blog.commented":
        document.update(comment_id=fields.pop("comment", f"cm-{event_id}"), post_id=fields.pop("post"))
    elif event_type == "social.shared":
        document.update(share_id=fields.pop("share", f"sh-{event_id}"), network=fields.pop("network", "x"))
    elif event_type == "feedback.submitted":
        document["feedback_id"] = fields.pop("feedback", f"fb-{event_id}")
    elif event_type == "points.redeem_requested":
        document.update(redemption_id=fields.pop("redemption", f"rd-{event_id}"), points=fields.pop("points"))
    elif event_type == "points.adjusted":
        document.update(adjustment_id=fields.pop("adjustment", f"ad-{event_id}"), points=fields.pop("points"))
        document.update(note=fields.pop("note", "goodwill"), actor=fields.pop("actor", "admin"))
    if event_type in ("purchase.completed", "customer.registered") and "segment" in fields:
        document["customer_segment"] = fields.pop("segment")
    for money in ("discount_total", "tax_total", "shipping_total", "fee_total"):
        if money in fields:
            document[money] = str(fields.pop(money))
    for money in ("paid_with_points", "paid_with_store_credit"):
        if money in fields:
            document[money] = str(fields.pop(money))
    document.update(fields)  # anything else (allow_negative, coupon_codes, ...) verbatim
    return document
