"""Input event documents for tests, as producers send them (importable from every test: tests/ is on the path
through tests/conftest.py)."""

from __future__ import annotations


def event_document(event_id: str, event_type: str, customer: str, at: str, **fields) -> dict:
    """An event's JSON document: the envelope (schema version 1, store s1) with the type's `fields`."""
    return {
        "event_id": event_id,
        "event_type": event_type,
        "schema_version": 1,
        "occurred_at": at,
        "customer_id": customer,
        "store_id": "s1",
        **fields,
    }
