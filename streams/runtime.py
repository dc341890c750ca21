"""Process wiring: `loyalty broker`, `loyalty worker` and `loyalty up` (broker if needed, worker, projector, API).

`up` runs the worker as a child process (Faust owns its event loop and signal handling) and, in its own
process, the projector and the HTTP API: the process that owns the chDB directory. It writes a run file
(`<data dir>/run.json`, mode 0600) with the API address and token, which the CLI's query commands read.

With a ClickHouse server DSN, `up` starts even while the server is unreachable, and survives it going away
later: the client connects (and migrates the schema) on first successful use, the worker does not need
ClickHouse at all, the projector retries with backoff while the ledger waits in Kafka, API queries answer
503 with the reason, and the status shows the projection backlog and the last ClickHouse error. An
embedded chDB directory that cannot be opened still stops `up` at start (no retry can help there).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.topics import ALL_TOPICS, DEAD_LETTER, INPUT_TOPICS, LEDGER
from streams.processes import stop_process
from streams.settings import Settings

log = logging.getLogger("loyalty")

worker_stop_timeout_s = 20.0
cutover_wait_s = 120.0
replay_progress_kept = 16  # replays whose progress GET /api/replay/progress can still tell


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Both log every failed request to an unreachable ClickHouse server at WARNING, with nothing that the
    # projector's own retry message does not say (and with request URLs); keep their errors only.
    for name in ("urllib3.connectionpool", "clickhouse_connect.driver._backend.http_sync"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_file_path(settings: Settings) -> Path:
    return settings.data_dir / "run.json"


def read_run_file(settings: Settings) -> dict[str, Any] | None:
    try:
        return json.loads(run_file_path(settings).read_text())
    except (OSError, ValueError):
        return None


def _write_run_file(settings: Settings, document: dict[str, Any]) -> None:
    path = run_file_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(document, handle)
    temporary.replace(path)


def run_broker(settings: Settings) -> int:
    from streams.broker import EmbeddedBroker, ensure_topics

    configure_logging(settings.log_level)
    with EmbeddedBroker(port=settings.broker_port) as broker:
        ensure_topics(broker.bootstrap, ALL_TOPICS, settings.partitions)
        print(
            f"embedded broker listening on {broker.bootstrap} (memory storage); "
            f"export LOYALTY_KAFKA_BOOTSTRAP={broker.bootstrap}",
            flush=True,
        )
        _wait_for_signal()
    return 0


def _wait_for_signal() -> None:
    stop = {"now": False}

    def handler(signum, frame) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop["now"]:
        time.sleep(0.2)


def run_worker(settings: Settings) -> int:
    from streams.worker import run

    if not settings.kafka_bootstrap:
        sys.stderr.write("loyalty worker: set LOYALTY_KAFKA_BOOTSTRAP (or use `loyalty up`)\n")
        return 2
    return run(settings)


class BrokerMonitor:
    """Fresh high water marks of every topic, and the worker group's committed offsets, for `loyalty status`.

    High water marks come from fetch responses of a consumer parked at the end of each partition: Tansu's
    ListOffsets answer ("latest") can trail the real end, its fetch high water mark does not.
    """

    fetch_max_wait_ms = 500

    def __init__(self, bootstrap: str, group: str, partitions: int) -> None:
        self.bootstrap = bootstrap
        self.group = group
        self.partitions = partitions
        self.highwaters: dict[tuple[str, int], int] = {}
        # Per partition, when the fetch response that gave its high water mark arrived (wall clock, ms). A
        # partition whose fetched records are not all consumed yet is not fetched again, so its mark can be older
        # than the last poll: `ends_fetched_after` goes by this, not by the number of polls.
        self.fetched_at: dict[tuple[str, int], int] = {}
        self.polls = 0  # getmany calls made

    async def run(self, stopping: asyncio.Event) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.structs import TopicPartition

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            group_id=None,
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            max_partition_fetch_bytes=64 * 1024,
            auto_offset_reset="latest",
        )
        await consumer.start()
        try:
            tps = [TopicPartition(t, p) for t in (*INPUT_TOPICS, LEDGER, DEAD_LETTER) for p in range(self.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            while not stopping.is_set():
                await consumer.getmany(timeout_ms=500, max_records=1000)
                for tp in tps:
                    highwater = consumer.highwater(tp)
                    if highwater is not None:
                        self.highwaters[(tp.topic, tp.partition)] = highwater
                        self.fetched_at[(tp.topic, tp.partition)] = consumer.last_poll_timestamp(tp) or 0
                self.polls += 1
        finally:
            await consumer.stop()

    def ends_fetched_after(self, topic: str, moment: float) -> dict[tuple[str, int], int] | None:
        """The ends of every partition of `topic` as fetch requests sent after `moment` (time.time()) saw them, or
        None while some partition has no such fetch yet. A response that arrived more than the broker's longest
        hold of a fetch (`fetch_max_wait_ms`, 500) after `moment` answers a request sent after it."""
        after_ms = moment * 1000 + self.fetch_max_wait_ms + 100
        ends = {}
        for partition in range(self.partitions):
            key = (topic, partition)
            if self.fetched_at.get(key, 0) <= after_ms or key not in self.highwaters:
                return None
            ends[key] = self.highwaters[key]
        return ends

    def committed(self) -> dict[tuple[str, int], int]:
        # kafka-python's admin, not aiokafka's: aiokafka's OffsetFetch request fails to parse on Tansu.
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            offsets = admin.list_group_offsets(self.group).get(self.group, {})
        finally:
            admin.close()
        return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items() if meta.offset >= 0}

    async def counts(self) -> dict[str, Any]:
        committed = await asyncio.to_thread(self.committed)
        lag: dict[str, int] = {}
        consumed = 0
        for topic in INPUT_TOPICS:
            for partition in range(self.partitions):
                done = committed.get((topic, partition), 0)
                consumed += done
                end = max(self.highwaters.get((topic, partition), 0), done)
                lag[topic] = lag.get(topic, 0) + end - done

        def total(topic: str) -> int:
            return sum(self.highwaters.get((topic, partition), 0) for partition in range(self.partitions))

        return {
            "consumer_lag": lag,
            "input_messages_committed": consumed,
            "input_messages": sum(total(topic) for topic in INPUT_TOPICS),
            "ledger_entries_emitted": total(LEDGER),
            "events_rejected": total(DEAD_LETTER),
        }


class ForgottenLog(RuntimeError):
    """The data directory's projections were read from a broker log that the embedded broker no longer has."""


def continue_data_directory(client, bootstrap: str, settings: Settings) -> None:
    """Before an embedded broker's `loyalty up` starts its worker and projector on a data directory that an
    earlier run filled: rebuild the broker's topics from ClickHouse (`streams.restore`), or refuse to start.

    The embedded broker keeps its log in memory, so it starts empty, while ClickHouse keeps the archive, the
    ledger and the positions the projector had read to. Going on without the topics would lose data silently:
    the projector would wait for the new log to pass those positions, and the worker, which rebuilds customers
    from the ledger topic, would start every customer from zero next to their old history.
    """
    from streams.restore import RestoreRefused, needs_restore, restore_topics

    if not needs_restore(client):
        return
    try:
        figures = restore_topics(client, bootstrap, settings.partitions)
    except RestoreRefused as error:
        raise ForgottenLog(
            f"the data directory {settings.data_dir} holds what an earlier `loyalty up` projected from its embedded "
            f"broker, whose log is gone (the embedded broker keeps it in memory), and it cannot be rebuilt: {error}. "
            "Start with a new data directory (LOYALTY_DATA_DIR or --data-dir), or set LOYALTY_KAFKA_BOOTSTRAP to a "
            "broker that kept its log."
        ) from None
    log.info(
        "continued the data directory %s: %d input messages, %d ledger entries and %d rule sets written back to "
        "the embedded broker; the worker reads the inputs again and recognises what it had applied",
        settings.data_dir,
        figures["input_messages"],
        figures["ledger_entries"],
        figures["rulesets"],
    )


def run_up(settings: Settings, *, demo: bool = False, demo_rate: float = 200.0) -> int:
    configure_logging(settings.log_level)
    try:
        return asyncio.run(_up(settings, demo=demo, demo_rate=demo_rate))
    except KeyboardInterrupt:
        return 0


async def _up(settings: Settings, *, demo: bool, demo_rate: float) -> int:
    from aiohttp import web

    from projections.archive import RawArchive
    from projections.client import ClickHouseUnavailable, ReconnectingClient
    from projections.schema import migrate
    from projections.sink import LedgerSink
    from streams.api import ApiContext, build_app
    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.projector import Projector
    from streams.rules.ruleset import load_ruleset

    ruleset = load_ruleset(settings.rules)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    broker = None
    bootstrap = settings.kafka_bootstrap
    if not bootstrap:
        broker = EmbeddedBroker(port=settings.broker_port, log_path=settings.data_dir / "broker.log").start()
        bootstrap = broker.bootstrap
        log.info("started the embedded broker on %s (memory storage)", bootstrap)
    worker: subprocess.Popen | None = None
    runner: web.AppRunner | None = None
    projecting: asyncio.Task | None = None
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    projectors: list = []

    def stop_signal() -> None:
        if stopping.is_set() and projectors and projectors[0].drain_on_stop_s:
            projectors[0].drain_on_stop_s = 0.0  # a second Ctrl-C: stop without taking the rest of the topics
            log.warning("asked again to stop: not waiting for the rest of the topics to be archived and projected")
        stopping.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop_signal)
    try:
        await asyncio.to_thread(ensure_topics, bootstrap, ALL_TOPICS, settings.partitions)
        dsn = settings.resolved_clickhouse_dsn()

        def prepare(connected) -> None:
            applied = migrate(connected)
            if applied:
                log.info("applied ClickHouse migrations %s", applied)

        client = ReconnectingClient(dsn, prepare=prepare)
        if dsn.startswith("chdb:"):
            client.ensure()  # the embedded engine: a directory that cannot be opened is a configuration error
        else:
            try:
                await asyncio.to_thread(client.ensure)
                log.info("connected to ClickHouse at %s", client.target)
            except ClickHouseUnavailable as error:
                log.warning(
                    "%s; starting anyway: the projector retries with backoff and the ledger waits in Kafka", error
                )
        client_lock = asyncio.Lock()
        sink = LedgerSink(client, batch_rows_max=settings.sink_batch_rows_max)
        if broker is not None:
            if not client.connected:
                raise ForgottenLog(
                    f"{client.last_error}; with the embedded broker, `loyalty up` needs ClickHouse at start to rebuild "
                    "the topics of a data directory an earlier run filled (without them it would start every customer "
                    "from zero): start again once ClickHouse answers"
                )
            await asyncio.to_thread(continue_data_directory, client, bootstrap, settings)
        monitor = BrokerMonitor(bootstrap, settings.worker_id, settings.partitions)
        projector = Projector(
            bootstrap=bootstrap,
            sink=sink,
            sink_lock=client_lock,
            partitions=settings.partitions,
            batch_rows_max=settings.sink_batch_rows_max,
            flush_interval_ms=settings.sink_flush_interval_ms,
            archive=RawArchive(client),
            highwaters=lambda: monitor.highwaters,
            # The embedded broker's log dies with this process: on a stop, archive and project all of it first.
            drain_on_stop_s=settings.stop_drain_s if broker is not None else 0.0,
        )
        projectors.append(projector)
        if settings.run_worker:
            environment = dict(
                os.environ, LOYALTY_KAFKA_BOOTSTRAP=bootstrap, LOYALTY_PARTITIONS=str(settings.partitions)
            )
            if settings.rules:
                environment["LOYALTY_RULES"] = str(settings.rules)
            # Its own session, like the broker's: on a Ctrl-C in the terminal, `up` stops it (first), not the signal.
            worker = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "worker"], env=environment, start_new_session=True
            )
            log.info("started the worker (pid %d)", worker.pid)
        else:
            # Workers run as their own service (docker-compose.yml); the endpoint port is then free for the
            # projector's sink metrics (with a worker child, the child inherits LOYALTY_METRICS_PORT instead).
            from streams.metrics import start_metrics_server

            start_metrics_server(settings)
            log.info("LOYALTY_RUN_WORKER is false: not starting a worker")

        token = settings.api_token.get_secret_value() if settings.api_token else secrets.token_urlsafe(24)

        async def status() -> dict[str, Any]:
            counts = await monitor.counts()
            try:
                projected = await _count_projected(client, client_lock)
            except ClickHouseUnavailable:
                projected = None  # unknown while ClickHouse is down; the backlog says what waits
            return {
                "consumer_lag": counts["consumer_lag"],
                "events_processed": counts["input_messages_committed"],
                "events_rejected": counts["events_rejected"],
                "input_messages": counts["input_messages"],
                "ledger_entries_emitted": counts["ledger_entries_emitted"],
                "ledger_rows_projected": projected,
                "projection_backlog": projector.backlog,
                "aggregate_days_pending": sink.dirty_days,
                "input_messages_archived": projector.messages_archived,
                "projection_error": projector.last_error,
                "projection_offsets_known": projector.offsets_known,
                "clickhouse_error": client.last_error,
                "worker_running": worker is not None and worker.poll() is None,
                "ruleset_version": context.ruleset.version,
            }

        # The rule set in force: the last one `loyalty replay --apply` activated (recorded in loyalty.rulesets),
        # else the configured one. It values liability, expiry and a replay's "before"; an apply replaces it.
        in_force = await ruleset_in_force(bootstrap, ruleset)
        if in_force is not ruleset:
            log.info(
                "rule set in force: %s (activated by replay --apply; configured: %s)", in_force.version, ruleset.version
            )
        context = ApiContext(client=client, client_lock=client_lock, ruleset=in_force, token=token, status=status)
        application = build_app(context)
        replays = ReplayProgress()
        application.router.add_post(
            "/api/replay",
            _replay_handler(
                client,
                client_lock,
                context,
                monitor,
                projector,
                bootstrap,
                settings.resolved_replay_processes(),
                stopping,
                replays,
                configured=ruleset,
            ),
        )
        application.router.add_get("/api/replay/progress", replays.handler())
        application.router.add_post("/api/projections/rebuild", _rebuild_handler(client, client_lock))
        runner = web.AppRunner(application, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://{settings.http_host}:{port}"
        _write_run_file(settings, {"pid": os.getpid(), "url": url, "token": token, "kafka_bootstrap": bootstrap})
        log.info("API and dashboard on %s (token in %s)", url, run_file_path(settings))
        # Secrets never go to the log: the link with the token is printed only to an interactive terminal.
        log.info("dashboard: %s/ (token in %s)", url, run_file_path(settings))
        if sys.stdout.isatty():
            print(f"open the dashboard: {url}/#token={token}", flush=True)
        # The projector has its own stop: it is the last to stop, after the worker, so that it can take what the
        # worker wrote before stopping (see Projector.drain_on_stop_s).
        projector_stopping = asyncio.Event()
        projecting = asyncio.create_task(projector.run(projector_stopping), name="projector")
        stop_asked = asyncio.create_task(stopping.wait(), name="stop-asked")
        tasks = [stop_asked, asyncio.create_task(monitor.run(stopping), name="monitor")]
        if demo:
            tasks.append(asyncio.create_task(_demo(bootstrap, demo_rate, stopping), name="demo"))
        if worker is not None:
            tasks.append(asyncio.create_task(_watch_worker(worker, stopping), name="watch-worker"))
        # Until a signal, the worker's exit, or the projector's failure (which stops everything: nothing would be
        # projected any more while the API went on answering).
        await asyncio.wait([projecting, stop_asked], return_when=asyncio.FIRST_COMPLETED)
        failed_alone = projecting.done()
        stopping.set()
        log.info("stopping: the worker first, then the projector")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if worker is not None:
            await asyncio.to_thread(stop_process, worker, worker_stop_timeout_s)
        projector_stopping.set()
        try:
            await projecting
        except Exception as error:
            if failed_alone:
                log.exception("the projector failed; stopping everything")
                return 1
            if broker is not None:
                log.error(
                    "stopping without every message of the embedded broker in ClickHouse (%s): what is not archived "
                    "or projected is lost with the broker",
                    error,
                )
                return 1
            # A stop while ClickHouse is down: Kafka keeps the log, and the next projector resumes from its offsets.
            log.warning("the projector stopped while its write failed (%s); it resumes from its stored offsets", error)
        return 0
    finally:
        if projecting is not None and not projecting.done():
            projecting.cancel()
            await asyncio.gather(projecting, return_exceptions=True)
        log.info("stopping")
        run_file_path(settings).unlink(missing_ok=True)
        if runner is not None:
            await runner.cleanup()
        if worker is not None:
            await asyncio.to_thread(stop_process, worker, worker_stop_timeout_s)
        if broker is not None:
            broker.stop()


async def ruleset_in_force(bootstrap: str, configured):
    """The rule set new events are decided by: the last one activated by `loyalty replay --apply` (its cut-over
    recorded in loyalty.rulesets by the worker), else `configured`."""
    from streams import cutover

    rulesets, activations, _ = await cutover.read_rulesets(bootstrap)
    if activations and activations[-1][3] in rulesets:
        return rulesets[activations[-1][3]]
    return configured


class ReplayProgress:
    """How far the running system's replays are, by the id each caller chose (`progress_id` of POST /api/replay),
    for GET /api/replay/progress?id=...: the CLI draws its progress bar from it while its POST waits for the report.

    A run is {"phase", "events" (replayed so far), "estimate" (archived messages: the bar's 100%), "done"}; the
    replay's thread updates it, the event loop reads it (single assignments of plain values). The last
    `replay_progress_kept` runs are kept."""

    id_pattern = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}

    def start(self, run_id: str) -> dict[str, Any]:
        self.runs.pop(run_id, None)
        run = self.runs[run_id] = {"phase": "starting", "events": 0, "estimate": 0, "done": False}
        while len(self.runs) > replay_progress_kept:
            self.runs.pop(next(iter(self.runs)))
        return run

    def handler(self):
        from aiohttp import web

        async def handle(request):
            run_id = request.query.get("id", "")
            if not self.id_pattern.match(run_id):
                return web.json_response(
                    {"error": "id: expected the progress_id of a replay request (1-64 of A-Z a-z 0-9 _ -)"}, status=400
                )
            run = self.runs.get(run_id)
            if run is None:
                return web.json_response({"error": f"no replay with progress id {run_id}"}, status=404)
            return web.json_response(dict(run))

        return handle


def _replay_handler(
    client,
    client_lock,
    context,
    monitor,
    projector,
    bootstrap,
    processes_default,
    stopping=None,
    replays=None,
    configured=None,
):
    """POST /api/replay {"rules": YAML text, "apply": bool, "since": date|null, "lag_max": n, "processes": n|null,
    "progress_id": id|null}; with "customer": id instead, that customer's preview (`replay.preview_customer`). With a
    progress id, GET /api/replay/progress tells how far it is (`ReplayProgress`). `configured`: the rule set the worker
    is started with (LOYALTY_RULES), for an apply's cap usage (`replay.dry_run`)."""
    from aiohttp import web

    from projections.archive import RawArchive
    from streams import replay
    from streams.rules.ruleset import RuleSetInvalid, parse_ruleset

    async def allowed(lag_max: int) -> None:
        """Refuse an apply while the worker lags beyond the bound or the archive has gaps."""
        counts = await monitor.counts()
        async with client_lock:
            gaps = await asyncio.to_thread(replay_archive_gaps, client)
        replay.check_apply_allowed(gaps=gaps, lag=sum(counts["consumer_lag"].values()), lag_max=lag_max)

    async def before_markers_in_clickhouse(
        markers: dict[tuple[str, int], int], refusal: str | None = None, wait_s: float | None = None
    ) -> None:
        """Wait until the worker has passed every marker, and everything before the markers is archived and its
        entries projected; events after them may go on arriving meanwhile. `refusal`: the message if it does not
        happen within the wait (else one about cut-over markers); `wait_s`: the wait (default `cutover_wait_s`)."""
        deadline = time.monotonic() + (cutover_wait_s if wait_s is None else wait_s)
        ledger_end: dict[tuple[str, int], int] | None = None
        while True:
            if ledger_end is None:
                committed = await asyncio.to_thread(monitor.committed)
                if all(committed.get(tp, 0) > offset for tp, offset in markers.items()):
                    # The worker produces an event's entries before it commits the event: the ledger's end, read
                    # by a fetch made after this point, holds every entry of the events before the markers.
                    moment = time.time()
                    while ledger_end is None and time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                        ledger_end = monitor.ends_fetched_after(LEDGER, moment)
            if ledger_end is not None and time.monotonic() <= deadline:
                archived, projected = projector.archived_to, projector.projected_to
                if all(archived.get(tp, 0) > offset for tp, offset in markers.items()) and all(
                    projected.get(key, 0) >= end for key, end in ledger_end.items()
                ):
                    return
            if time.monotonic() > deadline:
                if refusal is not None:
                    raise replay.ReplayRefused(refusal)
                raise replay.ReplayRefused(
                    f"the worker did not pass the cut-over markers, or the projector did not store what lies before "
                    f"them, within {cutover_wait_s:.0f}s; the new rule set is in force from them, and the worker holds "
                    "the events after them for the compensations (LOYALTY_CUTOVER_HOLD_S at most): run --apply "
                    "again to post them"
                )
            await asyncio.sleep(0.5)

    async def prepared_history(new_rules, processes: int, run: dict | None):
        """An apply's replay of the history the worker has decided (below its committed offsets, once archived and
        projected), before the markers are written: after them, only what arrived since is replayed, while the worker
        holds the events after the markers (`replay.prepare`)."""
        horizon, stored = await decided_offsets(cutover_wait_s)
        if not stored:
            raise replay.ReplayRefused(
                f"the projector did not store what the worker had decided within {cutover_wait_s:.0f}s; nothing "
                "was changed: run --apply again"
            )

        def replayed():
            progress = replaying(run)
            return replay.prepare(client, new_rules, horizon=horizon, processes=processes, progress=progress)

        async with client_lock:
            return await asyncio.to_thread(replayed)

    def replaying(run: dict | None) -> Callable[[int], None] | None:
        """In a replay's thread: the progress asked for (`ReplayProgress.start`) shown as replaying, with the
        archive's size as its 100%; returns what counts the events replayed into it."""
        if run is None:
            return None
        run["estimate"], run["phase"] = replay_archive_estimate(client), "replaying"

        def counted(events: int) -> None:
            run["events"] = events

        return counted

    async def dry_run(
        new_rules, since: datetime | None, processes: int, current=None, markers=None, run=None, prepared=None
    ) -> dict:
        """`current`: the rule set the live balances were valued by, when not the one in force now (an apply's);
        `markers`: an apply's cut-over markers (both sides cover what lies before them); `prepared`: its replay of the
        history before them (`prepared_history`). The client lock keeps the projector from writing meanwhile: both
        sides read one state of ClickHouse. `run`: the progress to update."""

        decided = await decided_offsets(replay.preview_settle_s) if markers is None else None
        undecided: set[str] = set()

        def replayed() -> dict:
            # After the markers with the history replayed before, the apply's phase says what is going on.
            progress = replaying(run) if prepared is None else None
            if decided is not None:  # under the lock: what is archived cannot move until the replay has read it
                undecided.update(RawArchive(client).keys_between(decided[0], dict(projector.archived_to)))
                # '' is no customer: an apply's control messages (markers, plan parts, which the worker keeps unacked
                # while it holds events) and keyless messages are archived under it.
                undecided.discard("")
            return replay.dry_run(
                client,
                new_rules,
                current_point_value=(current or context.ruleset).redemption.point_value,
                since=since,
                processes=processes,
                markers=markers,
                progress=progress,
                prepared=prepared,
                configured=configured,
            )

        async with client_lock:
            report = await asyncio.to_thread(replayed)
        if markers is None:
            conflict = await version_conflict(new_rules)
            report["warnings"] = [f"--apply would refuse: {conflict}"] if conflict else []
        if decided is not None:
            replay.note_undecided(report, undecided, stored=decided[1])
        return report

    async def decided_offsets(wait_s: float) -> tuple[dict[tuple[str, int], int], bool]:
        """The worker's committed offsets per input partition, once what lies below them is archived and its entries
        projected (waiting `wait_s` at most), and whether it was: an apply's horizon, or for a preview under traffic
        the point from which archived messages are not decided yet (their customers' differences can be lag)."""
        committed = await asyncio.to_thread(monitor.committed)
        offsets = {
            (topic, partition): committed.get((topic, partition), 0)
            for topic in INPUT_TOPICS
            for partition in range(projector.partitions)
        }
        # Offsets below them are decided: wait as for markers one below them (each is then passed).
        try:
            await before_markers_in_clickhouse(
                {tp: offset - 1 for tp, offset in offsets.items()}, refusal="", wait_s=wait_s
            )
        except replay.ReplayRefused:
            return offsets, False
        return offsets, True

    async def version_conflict(new_rules) -> str | None:
        async with client_lock:
            known = await asyncio.to_thread(replay.known_rulesets, client)
            activated = await asyncio.to_thread(replay.activated_versions, client)
        return replay.version_conflict(new_rules, known, context.ruleset, activated)

    async def _apply_replay(new_rules, text: str, lag_max: int, processes: int, run: dict | None) -> dict:
        from streams.cutover import publish_cutover

        def phase(text: str) -> None:
            if run is not None:
                run["phase"] = text

        phase("checking the rule set, the worker's lag and the archive")
        conflict = await version_conflict(new_rules)
        if conflict:
            raise replay.ReplayRefused(conflict)
        await allowed(lag_max)
        phase("waiting for the projector to store what the worker has decided")
        prepared = await prepared_history(new_rules, processes, run)
        # Again: the worker may have fallen behind while the history was replayed (minutes on a large archive), and
        # the bound is what lets it pass the markers within the wait; past it, refuse while nothing is changed.
        await allowed(lag_max)
        phase("publishing the rule set and the cut-over markers")
        async with client_lock:  # kept in ClickHouse too: a fresh embedded broker is rebuilt from there
            await asyncio.to_thread(
                client.insert,
                "rulesets",
                [[new_rules.version], [text]],
                column_names=("version", "text"),
                column_oriented=True,
            )
        markers = await asyncio.to_thread(publish_cutover, bootstrap, new_rules, text, projector.partitions)
        # From its markers on, the worker decides with the new rule set, whatever happens to this request.
        previous, context.ruleset = context.ruleset, new_rules
        # The comparison covers exactly what lies before the markers, on both sides: the events after them are
        # decided by the new rules already, and keep arriving while this runs.
        began = time.monotonic()
        phase("waiting for the worker to pass the markers and the projector to store what lies before them")
        await before_markers_in_clickhouse(markers)
        passed = time.monotonic()
        phase("replaying what arrived since; the worker holds the events after the markers until the compensations")
        report = await dry_run(
            new_rules, None, processes, current=previous, markers=markers, run=run, prepared=prepared
        )
        compared = time.monotonic()
        phase("publishing the compensations")
        report["applied"] = await asyncio.to_thread(replay.apply_report, report, bootstrap=bootstrap, markers=markers)
        # When each step after the markers was done, in seconds after them: the worker holds events meanwhile
        # (docs/replay.md, step 4).
        moments = {"worker_passed_markers": passed, "compared": compared, **report["applied"].pop("moments")}
        report["applied"]["after_markers_s"] = {step: round(moment - began, 3) for step, moment in moments.items()}
        for key in (replay.REVALUED_ORDERS, replay.PENDING_CHANGES, replay.RESTATED):  # went into the compensations
            report.pop(key, None)
        report["applied"]["markers"] = {
            f"{topic}/{partition}": offset for (topic, partition), offset in markers.items()
        }
        return report

    async def handle(request):
        try:
            body = await request.json()
            new_rules = parse_ruleset(str(body["rules"]), "request")
            since = replay.parse_since(str(body["since"])) if body.get("since") else None
            lag_max = int(body.get("lag_max", replay.lag_bound_messages))
            if lag_max < 0:
                raise ValueError(f"lag_max must be 0 or more, got {lag_max}")
            processes = int(body.get("processes") or processes_default)
            if not 1 <= processes <= replay.processes_max:
                raise ValueError(f"processes must be in 1..{replay.processes_max}, got {processes}")
            progress_id = body.get("progress_id")
            if progress_id is not None and not ReplayProgress.id_pattern.match(str(progress_id)):
                raise ValueError("progress_id must be 1-64 of A-Z a-z 0-9 _ -")
        except (ValueError, KeyError, TypeError, RuleSetInvalid) as error:
            return web.json_response({"error": f"bad replay request: {error}"}, status=400)
        run = replays.start(str(progress_id)) if progress_id is not None and replays is not None else None
        try:
            if body.get("customer") is not None:
                if body.get("apply"):
                    return web.json_response({"error": "bad replay request: customer goes without apply"}, status=400)
                async with client_lock:
                    report = await asyncio.to_thread(replay.preview_customer, client, new_rules, str(body["customer"]))
            elif body.get("apply") and stopping is not None and stopping.is_set():
                raise replay.ReplayRefused("the system is stopping: its worker may not reach the cut-over markers")
            elif body.get("apply"):
                report = await _apply_replay(new_rules, str(body["rules"]), lag_max, processes, run)
            else:
                report = await dry_run(new_rules, since, processes, run=run)
        except replay.ReplayRefused as error:
            return web.json_response({"error": str(error)}, status=409)
        finally:
            if run is not None:
                run["phase"], run["done"] = "done", True
        return web.json_response(report)

    return handle


def _rebuild_handler(client, client_lock):
    """POST /api/projections/rebuild: recompute the derived tables and swap them in (see projections.rebuild).

    The client lock is held throughout, so the projector's sink waits instead of writing into tables that
    are about to be swapped out, and no dashboard query runs against the half-done work.
    """
    from aiohttp import web

    from projections.rebuild import RebuildFailed, rebuild

    async def handle(request):
        try:
            async with client_lock:
                report = await asyncio.to_thread(rebuild, client, writers_excluded=True)
        except RebuildFailed as error:
            return web.json_response({"error": str(error)}, status=409)
        return web.json_response(report)

    return handle


def replay_archive_estimate(client) -> int:
    from projections.archive import RawArchive

    return RawArchive(client).estimate()


def replay_archive_gaps(client) -> list:
    from projections.archive import RawArchive

    return RawArchive(client).gaps()


async def _count_projected(client, client_lock: asyncio.Lock) -> int:
    async with client_lock:
        result = await asyncio.to_thread(client.query, "SELECT uniqExact(entry_id) FROM ledger_entries")
    return int(result.result_rows[0][0])


async def _watch_worker(worker: subprocess.Popen, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        if worker.poll() is not None:
            log.error("the worker exited with code %s; stopping", worker.returncode)
            stopping.set()
            return
        await asyncio.sleep(0.5)


async def _demo(bootstrap: str, rate: float, stopping: asyncio.Event) -> None:
    """Stream synthetic traffic at about `rate` events per second until stopped."""
    from streams.producer import make_producer
    from streams.routing import routes_for
    from streams.simulate import generate_events

    producer = await asyncio.to_thread(make_producer, bootstrap)
    seed = secrets.randbelow(1_000_000)
    # Demo traffic happens now, so the dashboard's default range (the last 30 days) shows it moving.
    lines = generate_events(
        events=10_000_000,
        customers=2_000,
        seed=seed,
        duplicate_share=0.02,
        bad_share=0.005,
        start=datetime.now(UTC),
        mean_gap_seconds=1 / max(rate, 1.0),
    )
    interval = 0.1
    per_tick = max(1, int(rate * interval))
    try:
        while not stopping.is_set():
            for _ in range(per_tick):
                raw = next(lines).encode()
                for route in routes_for(raw):
                    producer.send(route.topic, value=raw, key=route.key, headers=list(route.headers))
            await asyncio.sleep(interval)
    finally:
        await asyncio.to_thread(producer.close)
