"""What comes in and goes out: event contract v1, the ledger entry, and their JSON Schema export."""

from schemas.decode import EventRejected, decode_event
from schemas.events import AnyEvent, Event
from schemas.ledger import Kind, LedgerEntry, Source

__all__ = ["AnyEvent", "Event", "EventRejected", "Kind", "LedgerEntry", "Source", "decode_event"]
