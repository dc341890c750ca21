"""Hostile input: every message ends in the ledger, as a known duplicate, or as a dead letter with a reason.

Most examples drive `streams.applier.StreamApplier` (the worker's logic without Kafka) directly with messages
routed as the producer routes them; one test sends a hostile batch to a running worker on the embedded broker.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_checks import dead_letters_by_input, expected_ledger, ledger_by_entry_id
from reliability_support import wait_until

from schemas import events as contract
from schemas.topics import DEAD_LETTER, LEDGER, REFEREE_SIDE, SIDE_HEADER
from streams.applier import InputMessage, StreamApplier
from streams.batch import process_lines
from streams.routing import routes_for
from streams.rules.ruleset import load_ruleset

RULESET = load_ruleset()
PARTITIONS = 4
CUSTOMERS = ("c1", "c2", "c3")
AT = "2026-03-02T10:00:{:02d}+00:00"


def envelope(event_id: str, event_type: str, customer: str, second: int) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "event_type": event_type,
        "schema_version": 1,
        "occurred_at": AT.format(second % 60),
        "customer_id": customer,
        "store_id": "s1",
    }


def purchase(event_id: str, customer: str, second: int, quantity: Any = 1, price: Any = "12.50") -> dict:
    document = envelope(event_id, "purchase.completed", customer, second)
    document.update(
        order_id=f"o-{event_id}",
        currency="EUR",
        lines=[{"sku": "a", "category": "books", "quantity": quantity, "unit_price": price}],
    )
    return document


@st.composite
def valid_documents(draw: st.DrawFn, index: int) -> dict:
    customer = draw(st.sampled_from(CUSTOMERS))
    second = draw(st.integers(0, 59))
    event_id = f"e{index}"
    kind = draw(st.sampled_from(("purchase", "redeem", "adjust", "register", "share", "tick", "referral")))
    if kind == "purchase":
        return purchase(event_id, customer, second, draw(st.integers(1, 5)), draw(st.sampled_from(("9.99", "120"))))
    if kind == "redeem":
        document = envelope(event_id, "points.redeem_requested", customer, second)
        document.update(redemption_id=f"rd-{index}", points=draw(st.sampled_from((50, 100, 500))))
        return document
    if kind == "adjust":
        document = envelope(event_id, "points.adjusted", customer, second)
        document.update(adjustment_id=f"ad-{index}", points=draw(st.integers(-300, 300)), note="n", actor="ops")
        return document
    if kind == "register":
        return envelope(event_id, "customer.registered", customer, second)
    if kind == "share":
        document = envelope(event_id, "social.shared", customer, second)
        document.update(share_id=f"sh-{index}", network="x")
        return document
    if kind == "tick":
        return envelope(event_id, "clock.tick", customer, second)
    document = envelope(event_id, "referral.completed", customer, second)
    referee = draw(st.sampled_from(CUSTOMERS))
    document.update(referral_id=f"rf-{index}", referee_id=referee, order_id=f"o-e{draw(st.integers(0, index))}")
    return document


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@st.composite
def hostile_payloads(draw: st.DrawFn, index: int) -> bytes:
    """One payload that must be dead-lettered (or, for the edge cases that are valid, applied)."""
    base = purchase(f"h{index}", draw(st.sampled_from(CUSTOMERS)), draw(st.integers(0, 59)))
    kind = draw(
        st.sampled_from(
            (
                "bytes",
                "json_value",
                "oversized",
                "nested",
                "nan",
                "infinity",
                "year_1",
                "year_9999",
                "negative_quantity",
                "huge_quantity",
                "huge_points",
                "id_characters",
            )
        )
    )
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=200).filter(lambda raw: raw.strip(b" \t\r\n")))
    if kind == "json_value":
        value = draw(
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                max_leaves=8,
            )
        )
        return json.dumps(value).encode()
    if kind == "oversized":
        # Valid JSON and a valid event except for its size: trailing whitespace past the limit.
        return json.dumps(base).encode() + b" " * contract.payload_size_max_bytes
    if kind == "nested":
        return nested(draw(st.sampled_from((200, 5_000, 100_000))))
    if kind in ("nan", "infinity"):
        value = math.nan if kind == "nan" else draw(st.sampled_from((math.inf, -math.inf)))
        field = draw(st.sampled_from(("quantity", "unit_price")))
        base["lines"][0][field] = value
        return json.dumps(base).encode()  # Python writes the non-standard NaN / Infinity tokens
    if kind in ("year_1", "year_9999"):
        base["occurred_at"] = "0001-01-01T00:00:00+00:00" if kind == "year_1" else "9999-12-31T23:59:59+00:00"
        return json.dumps(base).encode()
    if kind == "negative_quantity":
        base["lines"][0]["quantity"] = draw(st.integers(max_value=0))
        return json.dumps(base).encode()
    if kind == "huge_quantity":
        base["lines"][0]["quantity"] = draw(st.integers(min_value=contract.line_quantity_max + 1))
        return json.dumps(base).encode()
    if kind == "huge_points":
        document = envelope(f"h{index}", "points.redeem_requested", "c1", 0)
        points = draw(st.integers(min_value=contract.points_request_max + 1) | st.integers(max_value=0))
        document.update(redemption_id=f"rd-h{index}", points=points)
        return json.dumps(document).encode()
    # Unicode, control characters and spaces in an identifier.
    field = draw(st.sampled_from(("event_id", "customer_id", "store_id", "order_id")))
    bad = draw(
        st.text(min_size=1, max_size=10).filter(lambda text: any(not ("\x21" <= char <= "\x7e") for char in text))
    )
    base[field] = bad
    return json.dumps(base, ensure_ascii=draw(st.booleans())).encode()


@st.composite
def hostile_logs(draw: st.DrawFn) -> list[bytes]:
    """A log of valid events, hostile payloads, exact re-sends and event ids reused with other content."""
    lines: list[bytes] = []
    documents: list[dict] = []
    for index in range(draw(st.integers(1, 40))):
        choice = draw(st.sampled_from(("valid", "valid", "valid", "hostile", "resend", "conflict")))
        if choice in ("resend", "conflict") and documents:
            original = draw(st.sampled_from(documents))
            if choice == "resend":
                lines.append(json.dumps(original).encode())
                continue
            changed = dict(original, store_id="s-other")  # same id and customer, other content
            lines.append(json.dumps(changed).encode())
            continue
        if choice == "hostile":
            lines.append(draw(hostile_payloads(index)))
            continue
        document = draw(valid_documents(index))
        documents.append(document)
        lines.append(json.dumps(document).encode())
    return lines


def messages_for(lines: list[bytes]) -> list[InputMessage]:
    """The messages the producer would publish for `lines`, with offsets per topic partition."""
    offsets: Counter[tuple[str, int]] = Counter()
    messages = []
    for line in lines:
        for route in routes_for(line):
            partition = zlib.crc32(route.key) % PARTITIONS if route.key else 0
            messages.append(
                InputMessage(
                    topic=route.topic,
                    partition=partition,
                    offset=offsets[(route.topic, partition)],
                    key=route.key,
                    value=line,
                    headers=route.headers,
                )
            )
            offsets[(route.topic, partition)] += 1
    return messages


def stream_applier(**options) -> StreamApplier:
    """An applier that holds every partition, routing derived events as `messages_for` routes input."""
    applier = StreamApplier(RULESET, partition_for=lambda key: zlib.crc32(key) % PARTITIONS, **options)
    applier.local_partitions.update(range(PARTITIONS))
    return applier


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(lines=hostile_logs(), batch_size=st.integers(1, 50))
def test_every_hostile_message_ends_in_the_ledger_as_a_duplicate_or_as_a_dead_letter(lines, batch_size):
    messages = messages_for(lines)
    applier = stream_applier(reorder_wait_ms=60_000)
    dead: dict[int, str] = {}
    acked: Counter[int] = Counter()
    ledger = []
    applied = duplicates = 0
    for start in range(0, len(messages), batch_size):
        for output in (applier.accept(messages[start : start + batch_size]),):
            dead.update({id(letter.message): letter.reason for letter in output.dead_letters})
            acked.update(id(message) for message in output.acks)
            assert not output.ledger and output.applied == 0
    output = applier.release([], set(), 0.0)  # every partition caught up: release everything
    dead.update({id(letter.message): letter.reason for letter in output.dead_letters})
    acked.update(id(message) for message in output.acks)
    ledger.extend(output.ledger)
    applied, duplicates = output.applied, output.duplicates
    assert applier.held_count == 0

    # Every message is acknowledged exactly once, after deciding where it ends.
    assert acked == Counter(id(message) for message in messages)
    assert all(reason for reason in dead.values())
    caused = {(entry.customer_id, entry.caused_by) for _, entry, _ in ledger}
    dead_values = {message.value for message in messages if id(message) in dead}
    silent_referee_copies = 0
    for message in messages:
        referee_copy = (SIDE_HEADER, REFEREE_SIDE) in message.headers
        if id(message) in dead:
            # A referee's copy is dead-lettered only for a conflict on the referee's own state; an invalid
            # referral is dead-lettered once, by its referrer's copy.
            assert not referee_copy or dead[id(message)].startswith("referee side: "), dead[id(message)]
            continue
        if referee_copy and message.value in dead_values:
            silent_referee_copies += 1  # its referrer's copy is the dead letter
            continue
        document = json.loads(message.value)
        customer = document["referee_id"] if referee_copy else document["customer_id"]
        # Applied (or a duplicate of what was applied): its event id is among the customer's `caused_by`.
        # A clock.tick that changes nothing is the documented exception: it leaves no entry.
        assert (customer, document["event_id"]) in caused or document["event_type"] == "clock.tick", (
            f"message neither applied, duplicate nor dead-lettered: {message.value[:200]!r}"
        )
    assert applied + duplicates + len(dead) + silent_referee_copies == len(messages)

    # An event id re-used with other content is a conflict: dead-lettered, never applied.
    fingerprints: dict[tuple[str, str], set[str]] = {}
    for _, entry, _ in ledger:
        fingerprints.setdefault((entry.customer_id, entry.caused_by), set()).add(entry.fingerprint)
    assert all(len(found) == 1 for found in fingerprints.values())

    # The stream's ledger and rejections equal the batch driver's on the same log.
    batch = process_lines(lines, RULESET)
    stream_ledger = sorted((entry.model_dump(mode="json") for _, entry, _ in ledger), key=lambda e: e["entry_id"])
    batch_ledger = sorted((entry.model_dump(mode="json") for entry in batch.ledger), key=lambda e: e["entry_id"])
    assert stream_ledger == batch_ledger
    assert Counter(message.value for message in messages if id(message) in dead) == Counter(
        lines[rejection.line - 1] for rejection in batch.rejected
    )


def test_an_event_id_reused_with_other_content_is_dead_lettered_as_a_conflict_and_never_applied():
    original = purchase("p1", "c1", 1)
    conflicting = dict(original, lines=[{"sku": "a", "category": "books", "quantity": 9, "unit_price": "900"}])
    lines = [json.dumps(original).encode(), json.dumps(conflicting).encode(), json.dumps(original).encode()]
    messages = messages_for(lines)
    applier = stream_applier()
    accepted = applier.accept(messages)
    output = applier.release([], set(), 0.0)
    assert accepted.dead_letters == []
    assert [(letter.message.value, letter.reason) for letter in output.dead_letters] == [
        (lines[1], "event_id: conflict: event id p1 was already applied with different content")
    ]
    assert {entry.fingerprint for _, entry, _ in output.ledger} == {output.ledger[0][1].fingerprint}
    assert sum(entry.points for _, entry, _ in output.ledger) == 12 + 100  # 12.50 floored, first order bonus
    assert (output.applied, output.duplicates, len(output.acks)) == (1, 1, 3)


def test_a_referral_whose_referee_side_conflicts_is_dead_lettered_as_the_batch_driver_rejects_it():
    # Event ids are scoped per customer: c2's purchase and c1's referral may both be called x1. The referral
    # is then fine for the referrer c1, and a conflict on the referee c2's partition.
    referee_purchase = purchase("x1", "c2", 1)
    referral = envelope("x1", "referral.completed", "c1", 2)
    referral.update(referral_id="rf1", referee_id="c2", order_id="o-x1")
    lines = [json.dumps(referee_purchase).encode(), json.dumps(referral).encode()]
    batch = process_lines(lines, RULESET)
    assert [(rejection.line, rejection.reason) for rejection in batch.rejected] == [
        (2, "referee side: event_id: conflict: event id x1 was already applied with different content")
    ]
    messages = messages_for(lines)
    applier = stream_applier()
    applier.accept(messages)
    output = applier.release([], set(), 0.0)
    assert [entry.model_dump() for _, entry, _ in output.ledger] == [entry.model_dump() for entry in batch.ledger]
    # Every message is counted somewhere: applied, duplicate or dead-lettered.
    assert output.applied + output.duplicates + len(output.dead_letters) == len(messages)
    assert [(letter.message.value, letter.reason) for letter in output.dead_letters] == [
        (lines[1], batch.rejected[0].reason)
    ]


HOSTILE_BATCH: list[bytes] = [
    b"\x00\xff\xfe not json at all",
    b"\xc3\x28",  # invalid UTF-8
    b"[1, 2, 3]",
    b'"just a string"',
    b'{"event_type": "purchase.completed"}',
    b'{"event_id": 7, "event_type": ["x"], "customer_id": {"a": 1}}',
    json.dumps(purchase("big", "c1", 3)).encode() + b" " * contract.payload_size_max_bytes,
    nested(5_000),
    b"[" * 50_000 + b"]" * 50_000,
    json.dumps(purchase("nan", "c1", 3, price=math.nan)).encode(),
    json.dumps(purchase("inf", "c1", 3, quantity=math.inf)).encode(),
    json.dumps(dict(purchase("y1", "c1", 3), occurred_at="0001-01-01T00:00:00+00:00")).encode(),
    json.dumps(dict(purchase("y9999", "c1", 3), occurred_at="9999-12-31T23:59:59+00:00")).encode(),
    json.dumps(purchase("neg", "c1", 3, quantity=-2)).encode(),
    json.dumps(purchase("huge", "c1", 3, quantity=10**40)).encode(),
    json.dumps(dict(purchase("uni", "c1", 3), customer_id="c\u00e9\u202e1")).encode(),
    json.dumps(dict(purchase("uni2", "c1", 3), customer_id="c\u00e9\u202e1"), ensure_ascii=False).encode(),
    json.dumps(dict(purchase("ctl\u0007", "c1", 3))).encode(),
    json.dumps(dict(purchase("sp", "c1", 3), order_id="o 1")).encode(),
]


@pytest.mark.integration
@pytest.mark.faults
def test_a_running_worker_dead_letters_each_hostile_message_and_keeps_running(
    broker, worker_factory, topic_tail_factory
):
    valid = purchase("ok1", "c1", 1)
    conflict = dict(valid, store_id="s-other")
    after = purchase("ok2", "c2", 59)
    lines = [json.dumps(valid).encode(), *HOSTILE_BATCH, json.dumps(conflict).encode(), json.dumps(after).encode()]
    expected = process_lines(lines, RULESET)
    assert len(expected.rejected) == len(HOSTILE_BATCH) + 1  # every hostile payload and the conflict

    tail = topic_tail_factory(broker.bootstrap, LEDGER, DEAD_LETTER)
    worker = worker_factory()
    from streams.producer import make_producer, produce_lines

    kafka = make_producer(broker.bootstrap)
    try:
        produce_lines(kafka, lines)
    finally:
        kafka.close()

    def done() -> bool:
        assert worker.poll() is None, worker.log_path.read_text()[-3000:]
        return len(dead_letters_by_input(tail.snapshot(DEAD_LETTER))) >= len(expected.rejected) and len(
            ledger_by_entry_id(tail.snapshot(LEDGER))[0]
        ) >= len(expected.ledger)

    wait_until(done, 90, "the worker to dead-letter the hostile batch and apply the valid events")
    letters = dead_letters_by_input(tail.snapshot(DEAD_LETTER))
    assert Counter(value for value, _ in letters.values()) == Counter(
        lines[rejection.line - 1] for rejection in expected.rejected
    )
    assert all(reason for _, reason in letters.values())
    streamed, changed = ledger_by_entry_id(tail.snapshot(LEDGER))
    assert changed == [] and streamed == expected_ledger(expected)
    assert worker.poll() is None, "the worker must survive hostile input"
