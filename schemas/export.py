"""JSON Schema export of every event union and the ledger entry, for producers in other languages."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import TypeAdapter

from schemas import events, topics
from schemas.ledger import LedgerEntry

_documents = {
    "loyalty.purchases": events.PurchaseEvent,
    "loyalty.reviews": events.ReviewEvent,
    "loyalty.referrals": events.ReferralEvent,
    "loyalty.engagement": events.EngagementEvent,
    "loyalty.redemptions": events.RedemptionEvent,
    "event": events.AnyEvent,
}


def export_json_schemas(directory: Path) -> list[Path]:
    """Write one `<name>.schema.json` per topic union, one for any event, and one for the ledger entry."""
    assert set(_documents) - {"event"} == set(topics.INPUT_TOPICS)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, annotated in _documents.items():
        document = TypeAdapter(annotated).json_schema(mode="validation")
        document["title"] = name
        path = directory / f"{name}.schema.json"
        path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        written.append(path)
    ledger_path = directory / "loyalty.ledger.schema.json"
    ledger_path.write_text(json.dumps(LedgerEntry.model_json_schema(mode="serialization"), indent=2) + "\n")
    written.append(ledger_path)
    return written
