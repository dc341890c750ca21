"""The Faust stream worker: input topics -> StreamApplier (pure core) -> loyalty.ledger / loyalty.dead-letter.

Plumbing only. One agent consumes the five input topics with concurrency 1 and takes events in batches
without acking them (`noack_take`); an event is acked only after every ledger entry and dead letter it
caused has been acknowledged by the broker, so a crash re-delivers it (at-least-once) and the restored
state (a fold of the ledger) recognises it and awards nothing twice. No Kafka transactions are used.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from collections import Counter
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition as KafkaTopicPartition

from schemas.ledger import LedgerEntry
from schemas.topics import CONTROL_HEADER, DEAD_LETTER, INPUT_TOPICS, LEDGER, REFERRALS, RULESET_CONTROL, RULESETS
from streams import cutover, metrics
from streams.acks import InOrderAcks
from streams.applier import InputMessage, Output, StreamApplier
from streams.routing import partition_for
from streams.rules.ruleset import RuleSet, load_ruleset
from streams.settings import Settings

log = logging.getLogger("loyalty.worker")

restore_poll_ms = 200
EVENT_ENTRIES_HEADER = "loyalty-event-entries"
INPUT_HEADER = "loyalty-input"  # on ledger and dead-letter messages: the input message they came from
in_flight_batches_max = 4
# How often held events are looked at between batches: the settle (LOYALTY_REORDER_SETTLE_MS, see
# StreamApplier) plus at most this much latency.
release_interval_s = 0.05
# The worker allocates many short-lived objects per event; with the default thresholds (700, 10, 10) the
# collector ran so often that applying 51k events in-process took 8.5 CPU-s against 5.1 with these.
gc_thresholds = (50_000, 20, 100)
restore_timeout_s = 600.0
producer_linger_ms = 5
producer_max_batch_bytes = 1024 * 1024


class WorkerCounters:
    """Counts since start, logged periodically and exported by the metrics endpoint."""

    def __init__(self) -> None:
        self.processed = 0
        self.rejected = 0
        self.duplicates = 0
        self.ledger_entries = 0


def ledger_headers(message: InputMessage, event_entries: int) -> list[tuple[str, bytes]]:
    """Where the entry came from, and how many entries its event produced (so a restore can tell a complete
    event from one whose writing was interrupted by a crash)."""
    return [
        (INPUT_HEADER, f"{message.topic}/{message.partition}/{message.offset}".encode()),
        (EVENT_ENTRIES_HEADER, str(event_entries).encode()),
    ]


def event_entries_of(headers) -> int | None:
    for name, value in headers or ():
        if name == EVENT_ENTRIES_HEADER:
            return int(value)
    return None


# Byte-identical to `entry.model_dump_json().encode()` without the str round trip.
serialize_entry = LedgerEntry.__pydantic_serializer__.to_json


def dead_letter_headers(message: InputMessage, reason: str) -> list[tuple[str, bytes]]:
    return [
        ("loyalty-reason", reason.encode()[:2000]),
        (INPUT_HEADER, f"{message.topic}/{message.partition}/{message.offset}".encode()),
        *[(name, value) for name, value in message.headers],
    ]


def create_app(settings: Settings, ruleset: RuleSet | None = None) -> faust.App:
    """The Faust application of the worker; everything it needs hangs off the app object."""
    ruleset = ruleset or load_ruleset(settings.rules)
    faust_dir = settings.data_dir / f"{settings.worker_id}-faust"
    faust_dir.parent.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    app = faust.App(
        settings.worker_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        # Faust makes a directory even with memory tables; by default `<id>-data` in the working directory.
        datadir=str(faust_dir),
        topic_partitions=settings.partitions,
        topic_allow_declare=False,
        topic_disable_leader=True,
        processing_guarantee="at_least_once",
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=settings.batch_size_max,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4096, settings.batch_size_max * 2),
        stream_wait_empty=False,
        # Tansu holds a JoinGroup for half the session timeout: Faust's default of 60 s meant a 30 s stall.
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.session_timeout_s / 6),
        broker_rebalance_timeout=settings.session_timeout_s,
    )
    applier = StreamApplier(
        ruleset,
        reorder_wait_ms=settings.reorder_wait_ms,
        partition_for=functools.partial(partition_for, partitions=settings.partitions),
        caught_up_settle_ms=min(settings.reorder_settle_ms, settings.reorder_wait_ms),
        cutover_hold_ms=settings.cutover_hold_s * 1000,
    )
    counters = WorkerCounters()
    lock = asyncio.Lock()
    restored: set[int] = set()
    last_assigned: set[int] = set()  # the input partitions of the latest assignment
    lost: set[int] = set()  # partitions given to another worker since: restored again if they come back
    producer_box: dict[str, AIOKafkaProducer] = {}
    app.loyalty_applier = applier  # type: ignore[attr-defined]
    app.loyalty_counters = counters  # type: ignore[attr-defined]
    metrics.record_ruleset(ruleset.version)

    source = app.topic(*INPUT_TOPICS, key_type=bytes, value_type=bytes, value_serializer="raw", key_serializer="raw")

    async def producer() -> AIOKafkaProducer:
        if "ledger" not in producer_box:
            created = AIOKafkaProducer(
                bootstrap_servers=settings.kafka_bootstrap,
                acks="all",
                linger_ms=producer_linger_ms,
                max_batch_size=producer_max_batch_bytes,
                enable_idempotence=False,
            )
            await created.start()
            producer_box["ledger"] = created
        return producer_box["ledger"]

    async def load_rulesets() -> None:
        """Rule sets and cut-overs recorded in loyalty.rulesets (by `loyalty replay --apply`)."""
        rulesets, activations, ended = await cutover.read_rulesets(settings.kafka_bootstrap)
        for known in rulesets.values():
            applier.know_ruleset(known)
        for (topic, partition, offset), how in ended.items():
            applier.wait_ended(topic, partition, offset, how)
        for topic, partition, offset, version in activations:
            if version in applier.rulesets:
                applier.activate(topic, partition, offset, version)
        if activations and activations[-1][3] in applier.rulesets:
            metrics.record_ruleset(activations[-1][3])  # the newest cut-over's rule set decides new events

    async def restore_partitions(partitions: set[int]) -> None:
        """Fold the ledger partitions into the states of their customers, reading each to its high water mark.

        The end is taken from fetch responses (`highwater`), not from ListOffsets: Tansu answers ListOffsets
        "latest" with the base offset of the last record batch + 1, which would stop the read early.
        """
        started = time.monotonic()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            enable_auto_commit=False,
            group_id=None,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await consumer.start()
        folded = 0
        try:
            tps = [KafkaTopicPartition(LEDGER, partition) for partition in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            remaining = set(tps)
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=restore_poll_ms, max_records=20_000)
                for tp, records in batch.items():
                    folded += applier.restore(
                        tp.partition,
                        (
                            (LedgerEntry.model_validate_json(record.value), event_entries_of(record.headers))
                            for record in records
                        ),
                    )
                for tp in list(remaining):
                    highwater = consumer.highwater(tp)
                    if highwater is not None and await consumer.position(tp) >= highwater:
                        remaining.discard(tp)
                if time.monotonic() - started > restore_timeout_s:
                    raise RuntimeError(f"restoring ledger partitions {sorted(partitions)} took too long")
            dropped = sum(applier.finish_restore(partition) for partition in partitions)
            if dropped:
                log.warning("dropped %d partially written events at the end of the ledger (re-decided)", dropped)
            log.info(
                "restored ledger partitions %s: %d entries folded in %.2fs",
                sorted(partitions),
                folded,
                time.monotonic() - started,
            )
        finally:
            await consumer.stop()

    def assigned_input() -> list[tuple[str, int]]:
        return sorted((tp.topic, tp.partition) for tp in app.consumer.assignment() if tp.topic in INPUT_TOPICS)

    def caught_up(seen: dict[tuple[str, int], int]) -> dict[tuple[str, int], float]:
        """The assigned input partitions whose last fetch found nothing beyond what the agent received, each with
        the time of that fetch (`last_fetch_ms`)."""
        done = {}
        for topic, partition in assigned_input():
            tp = faust.types.TP(topic, partition)
            try:
                highwater = app.consumer.highwater(tp)
                fetched_ms = last_fetch_ms(tp)
            except Exception:  # no fetch yet for this partition
                continue
            if highwater is None or fetched_ms is None:
                continue
            if seen.get((topic, partition), -1) + 1 >= highwater:
                done[(topic, partition)] = fetched_ms
        return done

    def last_fetch_ms(tp: faust.types.TP) -> float | None:
        """When the consumer last had a fetch response for `tp` (the time its high water mark is from), in ms on
        the monotonic clock of `received_ms` (aiokafka records it on the wall clock).

        Faust does not expose it; its aiokafka driver's consumer does (`last_poll_timestamp`). A paused partition
        is not fetched, so its time stays old and the partition is not taken for caught up on a stale mark."""
        try:
            consumer = app.consumer._thread._ensure_consumer()
        except AttributeError:  # another Faust driver: trust the mark as fresh (the settle still applies)
            if not fetch_time_unknown:
                fetch_time_unknown.append(True)
                log.warning("the consumer does not say when it fetched; high water marks are taken as fresh")
            return time.monotonic() * 1000
        try:
            fetched_wall_ms = consumer.last_poll_timestamp(tp)
        except (AssertionError, KeyError):  # not assigned (any more), or no fetch state yet
            return None
        if fetched_wall_ms is None:
            return None
        return fetched_wall_ms + time.monotonic() * 1000 - time.time() * 1000

    fetch_time_unknown: list[bool] = []
    late_reported = [0]
    seen_offsets: dict[tuple[str, int], int] = {}
    in_flight: set[asyncio.Future] = set()
    acks = InOrderAcks()
    failed: list[Exception] = []
    last_finish: list[asyncio.Future] = []  # the latest batch's finish: each batch acks after the one before

    async def send(output: Output) -> None:
        for partition, version, customers in output.planned:
            log.info(
                "apply of %s: plan read on partition %d, %d customers to compensate; the other customers' held events "
                "follow",
                version,
                partition,
                customers,
            )
        if not (output.ledger or output.dead_letters or output.acks or output.derived or output.ended):
            return
        kafka = await producer()
        if output.derived:
            # Derived events (referral.reversed for a referrer) are acknowledged before this release's ledger
            # entries are sent: if the worker dies in between, the refund that derived them is not marked
            # applied in the ledger, is re-delivered and derives them again (the copies are duplicates).
            sent = [
                await kafka.send(REFERRALS, value=m.value, key=m.key, partition=m.partition, headers=list(m.headers))
                for m in output.derived
            ]
            await asyncio.gather(*sent)
        per_event = Counter((entry.customer_id, entry.caused_by) for _, entry, _ in output.ledger)
        futures = await send_batches(
            kafka,
            (
                (
                    LEDGER,
                    partition,
                    entry.customer_id.encode(),
                    serialize_entry(entry),
                    ledger_headers(message, per_event[(entry.customer_id, entry.caused_by)]),
                )
                for partition, entry, message in output.ledger
            ),
        )
        for dead in output.dead_letters:  # one by one: a dead letter can be as large as a whole batch
            futures.append(
                await kafka.send(
                    DEAD_LETTER,
                    value=dead.message.value,
                    key=dead.message.key,
                    partition=dead.message.partition,
                    headers=dead_letter_headers(dead.message, dead.reason),
                )
            )
        for topic, partition, offset, version in output.activations:
            key, value = cutover.activation_record(topic, partition, offset, version)
            futures.append(await kafka.send(RULESETS, value=value, key=key, partition=0))
            log.info("rule set %s in force on %s/%d after offset %d", version, topic, partition, offset)
            metrics.record_ruleset(version)
        for topic, partition, offset, version, how in output.ended:
            if how == "compensated":
                log.info(
                    "apply of %s: compensations applied on partition %d, the held events of %s/%d follow",
                    version,
                    partition,
                    topic,
                    partition,
                )
            else:
                log.warning(
                    "apply of %s: the events of %s/%d after its cut-over at offset %d are released without its "
                    "compensations (%s; LOYALTY_CUTOVER_HOLD_S): they are decided on the state before them",
                    version,
                    topic,
                    partition,
                    offset,
                    how,
                )
        # The batch's acks wait for its sends in a task: the next batch is decided while this one is on its
        # way (the worker spent 22% of its time idle waiting for acks). A failed send crashes the worker
        # before any of its messages is acked; batches ack in order, and each input partition's messages in
        # offset order (streams/acks.py), so a commit never passes a message whose entries are not written.
        task = asyncio.ensure_future(finish(futures, output, last_finish[0] if last_finish else None))
        last_finish[:] = [task]
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        while len(in_flight) > in_flight_batches_max:
            await asyncio.wait(set(in_flight), return_when=asyncio.FIRST_COMPLETED)

    async def send_batches(kafka: AIOKafkaProducer, records) -> list[asyncio.Future]:
        """Send (topic, partition, key, value, headers) records as one batch per topic partition, in order.

        A `send` per message cost most of the worker's send time; the ceiling measured 8x more messages/s
        with `send_batch`. Each partition's records keep their order (a full batch is sent before the next).
        """
        batches: dict[tuple[str, int], Any] = {}
        futures = []
        for topic, partition, key, value, headers in records:
            batch = batches.get((topic, partition))
            if batch is None:
                batch = batches[(topic, partition)] = kafka.create_batch()
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                futures.append(await kafka.send_batch(batch, topic, partition=partition))
                batch = batches[(topic, partition)] = kafka.create_batch()
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    raise ValueError(f"a {len(value)}-byte record does not fit in a producer batch")
        for (topic, partition), batch in batches.items():
            if batch.record_count():
                futures.append(await kafka.send_batch(batch, topic, partition=partition))
        return futures

    async def finish(futures: list, output: Output, previous: asyncio.Future | None) -> None:
        try:
            if futures:
                await asyncio.gather(*futures)
        except Exception as error:
            log.exception("a ledger write failed; crashing so that a restart re-delivers the batch")
            failed.append(error)
            await app.crash(error)
            return
        try:
            if previous is not None:
                # Acks in batch order: a later batch may hold a duplicate of an event whose entries an earlier
                # batch is still writing (a re-delivered copy, or the published copy of a derived event).
                await previous
            if failed:
                return  # the worker is crashing: this batch may hold duplicates of events whose write failed
            if output.ended:
                # Recorded once this batch's entries (the compensations') and every earlier batch's are written, and
                # before its acks: a restart then either waits again (nothing recorded, nothing acked) or finds every
                # compensation in the ledger.
                kafka = await producer()
                records = [cutover.ended_record(*ended) for ended in output.ended]
                sent = [await kafka.send(RULESETS, value=value, key=key, partition=0) for key, value in records]
                await asyncio.gather(*sent)
            for token in acks.done(((message.topic, message.partition), message.offset) for message in output.acks):
                token.ack()
        except BaseException as error:
            # Every later batch waits for this one: a failure here would stop all acks without a word.
            failed.append(error if isinstance(error, Exception) else RuntimeError("a batch's acks were cancelled"))
            if isinstance(error, Exception):
                log.exception("acking a batch failed; crashing so that a restart re-delivers it")
                await app.crash(error)
            raise
        counters.processed += output.applied
        counters.duplicates += output.duplicates
        counters.rejected += len(output.dead_letters)
        counters.ledger_entries += len(output.ledger)
        metrics.record_output(output)

    async def release() -> None:
        output = applier.release(assigned_input(), caught_up(seen_offsets), time.monotonic() * 1000)
        await send(output)

    @app.agent(source, concurrency=1)
    async def apply_events(stream: faust.StreamT) -> None:
        batches = stream.noack().noack_take(settings.batch_size_max, within=settings.batch_wait_ms / 1000)
        async for batch in batches:
            try:
                async with lock:
                    now_ms = time.monotonic() * 1000
                    fetched: dict[tuple[str, int], float | None] = {}
                    messages = []
                    for event in batch:
                        raw = event.message
                        if raw.partition not in restored:
                            await restore_partitions({raw.partition})
                            restored.add(raw.partition)
                            applier.local_partitions.add(raw.partition)
                        tp = (raw.topic, raw.partition)
                        if tp not in fetched:
                            fetched[tp] = last_fetch_ms(faust.types.TP(*tp))
                        seen_offsets[tp] = max(seen_offsets.get(tp, -1), raw.offset)
                        acks.received(tp, raw.offset, event)
                        messages.append(
                            InputMessage(
                                topic=raw.topic,
                                partition=raw.partition,
                                offset=raw.offset,
                                key=raw.key,
                                value=raw.value if isinstance(raw.value, bytes) else bytes(raw.value or b""),
                                headers=tuple((name, bytes(value)) for name, value in (raw.headers or [])),
                                token=event,
                                received_ms=now_ms,
                                fetched_ms=fetched[tp],
                            )
                        )
                    markers = {
                        message.value.decode("utf-8", "replace")
                        for message in messages
                        if (CONTROL_HEADER, RULESET_CONTROL) in message.headers
                    }
                    if markers - set(applier.rulesets):
                        await load_rulesets()  # the document is written before its markers
                    await send(applier.accept(messages))
                    await release()
            except Exception as error:
                # An exception escaping a Faust agent restarts it and can lose messages; crash the worker
                # instead: nothing unacked is committed, so a restart re-delivers and re-folds exactly.
                log.exception("worker failed; crashing so that a restart resumes from the last commit")
                await app.crash(error)
                return

    @app.timer(interval=release_interval_s)
    async def release_waiting() -> None:
        if applier.held_count or applier.waiting:
            try:
                async with lock:
                    await release()
            except Exception as error:
                log.exception("worker failed while releasing held events")
                await app.crash(error)

    @app.timer(interval=metrics.lag_interval_s)
    async def export_lag() -> None:
        metrics.record_consumer_lag(
            assigned_input(),
            lambda *tp: app.consumer.highwater(faust.types.TP(*tp)),
            seen_offsets,
            applier.held_count,
            late=applier.late_events,
            settle_ms=applier.settle_ms(time.monotonic() * 1000),
            held_for_apply=applier.waiting_count,
        )

    @app.timer(interval=10.0)
    async def report() -> None:
        settle_ms = applier.settle_ms(time.monotonic() * 1000)
        log.info(
            "processed %d, duplicates %d, rejected %d, ledger entries %d, waiting %d, held for an apply %d, late %d, "
            "settle %d ms",
            counters.processed,
            counters.duplicates,
            counters.rejected,
            counters.ledger_entries,
            applier.held_count,
            applier.waiting_count,
            applier.late_events,
            settle_ms,
        )
        if applier.late_events > late_reported[0]:
            log.warning(
                "%d events were applied out of event-time order (their customer already had a later event "
                "applied: they arrived too late); the settle is now %d ms (LOYALTY_REORDER_WAIT_MS bounds it)",
                applier.late_events - late_reported[0],
                settle_ms,
            )
            for example in applier.late_examples:
                log.warning("applied late: %s", example)
            applier.late_examples.clear()
            late_reported[0] = applier.late_events

    @app.on_partitions_revoked.connect
    async def on_revoked(app_: Any, revoked: set, **_: Any) -> None:
        partitions = {tp.partition for tp in revoked if tp.topic in INPUT_TOPICS}
        if in_flight:
            # Let the batches on their way be acked before Faust commits the revoked partitions.
            await asyncio.gather(*list(in_flight), return_exceptions=True)
        async with lock:
            # A batch decided while this waited for the lock is on its way now: let it land too, before the
            # states are forgotten (a restore must read its entries) and before Faust commits its acks.
            if in_flight:
                await asyncio.gather(*list(in_flight), return_exceptions=True)
            # The consumer still reports the old assignment here, so under Faust's eager rebalance this
            # forgets nothing; `on_assigned` does (docs/architecture.md, "Partitions").
            still = {partition for _, partition in assigned_input()}
            for partition in partitions - still:
                applier.forget(partition)
                restored.discard(partition)
            for tp in list(seen_offsets):
                if tp[1] in partitions - still:
                    del seen_offsets[tp]
                    acks.forget(tp)

    @app.on_partitions_assigned.connect
    async def on_assigned(app_: Any, assigned: set, **_: Any) -> None:
        partitions = {tp.partition for tp in assigned if tp.topic in INPUT_TOPICS}
        log.info("assigned input partitions %s", sorted(partitions))
        async with lock:
            # The revocation handler cannot forget (the consumer still reports the old assignment there):
            # partitions held before and not now are forgotten here, and a partition given away at an earlier
            # assignment that comes back is restored again even if a state is left from a stale message
            # (another worker decided its events meanwhile). Messages are never dropped here.
            returning = partitions & lost
            for partition in (restored - partitions) | returning:
                applier.forget(partition)
                restored.discard(partition)
                for tp in [tp for tp in seen_offsets if tp[1] == partition]:
                    del seen_offsets[tp]
                    acks.forget(tp)
            lost.difference_update(returning)
            lost.update(last_assigned - partitions)
            last_assigned.clear()
            last_assigned.update(partitions)
            await load_rulesets()
            fresh = partitions - restored
            if fresh:
                await restore_partitions(fresh)
                restored.update(fresh)
                applier.local_partitions.update(fresh)

    return app


def run(settings: Settings) -> int:
    """Run the worker until interrupted (SIGINT/SIGTERM)."""
    from schemas.topics import ALL_TOPICS
    from streams.broker import ensure_topics

    assert settings.kafka_bootstrap, "the worker needs LOYALTY_KAFKA_BOOTSTRAP"
    gc.set_threshold(*gc_thresholds)
    ensure_topics(settings.kafka_bootstrap, ALL_TOPICS, settings.partitions)
    app = create_app(settings)
    # aiokafka's per-message debug logging cost 7.7% of the worker's time in a profile: keep it quiet.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    metrics.start_metrics_server(settings)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
    worker.execute_from_commandline()
    return 0
