"""The `loyalty` command: one entry point for every driver, tool and query (see docs/cli.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from schemas.decode import EventRejected, decode_event
from streams.client import customer_path
from streams.rules.ruleset import RuleSetInvalid, load_ruleset, parse_ruleset, read_ruleset_text

progress_bar_width = 30  # characters of the replay's progress bar on a terminal
progress_poll_s = 0.25  # how often the CLI asks the running system how far its replay is


def _print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=None, separators=(",", ":"), default=str) + "\n")


def _fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"loyalty: {message}\n")
    return code


def _settings(args: argparse.Namespace):
    from streams.settings import load_settings

    return load_settings(
        rules=getattr(args, "rules", None),
        data_dir=getattr(args, "data_dir", None),
        partitions=getattr(args, "partitions", None),
        kafka_bootstrap=getattr(args, "bootstrap", None),
        clickhouse_dsn=getattr(args, "clickhouse_dsn", None),
        http_port=getattr(args, "port", None),
    )


# --- offline commands ----------------------------------------------------------------------------


def cmd_process(args: argparse.Namespace) -> int:
    from streams.batch import process_lines

    ruleset = load_ruleset(args.rules)
    with open(args.events, "rb") as log:
        result = process_lines(log, ruleset)
    if args.json:
        _print_json(result.to_json())
        return 0
    print(
        f"rule set {ruleset.version}: {len(result.ledger)} ledger entries, {len(result.states)} customers, "
        f"{len(result.rejected)} rejected lines, {result.duplicates} duplicates applied once"
    )
    for rejection in result.rejected[:20]:
        print(f"  line {rejection.line}: {rejection.reason}")
    top = sorted(result.balances().items(), key=lambda item: -item[1])[:10]
    for customer_id, balance in top:
        print(f"  {customer_id:<24} {balance:>10}")
    return 0


def cmd_rules_validate(args: argparse.Namespace) -> int:
    try:
        ruleset = load_ruleset(args.file)
    except RuleSetInvalid as error:
        if args.json:
            _print_json(
                {
                    "valid": False,
                    "file": str(args.file),
                    "problems": [{"path": path, "reason": reason} for path, reason in error.problems],
                }
            )
        else:
            for path, reason in error.problems:
                # A problem of the whole file (it cannot be read) has no key path.
                sys.stderr.write(f"{args.file}: {path}: {reason}\n" if path else f"{args.file}: {reason}\n")
        return 1
    if args.json:
        _print_json({"valid": True, "file": str(args.file), "version": ruleset.version})
    else:
        print(f"{args.file}: valid rule set, version {ruleset.version}")
    return 0


def cmd_rules_explain(args: argparse.Namespace) -> int:
    from streams.batch import process_lines

    ruleset = load_ruleset(args.rules)
    # An argument that looks like JSON is the event itself (a long one is not a valid file name anyway).
    text = args.events.encode() if args.events.lstrip().startswith("{") else Path(args.events).read_bytes()
    lines = text.splitlines()
    if len(lines) == 1:
        try:
            decode_event(lines[0])
        except EventRejected as error:
            return _fail(f"the event is rejected: {error.reason}", 1)
    result = process_lines(lines, ruleset)
    if args.json:
        _print_json({"ruleset_version": ruleset.version, **result.to_json()})
        return 0
    for entry in result.ledger:
        print(
            f"{entry.occurred_at.isoformat()} {entry.customer_id} {entry.caused_by} [{entry.kind.value}] "
            f"{entry.points:+d} (pending {entry.pending_points:+d}) -> balance {entry.balance_after}"
        )
        print(f"    rule {entry.rule_id} @ {entry.ruleset_version}: {entry.explanation}")
    for rejection in result.rejected:
        print(f"line {rejection.line}: rejected: {rejection.reason}")
    return 0


def cmd_schemas_export(args: argparse.Namespace) -> int:
    from schemas.export import export_json_schemas

    for path in export_json_schemas(Path(args.directory)):
        print(path)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from streams.simulate import generate_events

    lines = generate_events(
        events=args.events,
        customers=args.customers,
        seed=args.seed,
        stores=args.stores,
        duplicate_share=args.duplicate_share,
        bad_share=args.bad_share,
        mean_gap_seconds=args.mean_gap_seconds,
        disputed_referral_share=args.disputed_referral_share,
    )
    output = open(args.out, "w") if args.out else sys.stdout
    try:
        for line in lines:
            output.write(line + "\n")
    finally:
        if args.out:
            output.close()
    return 0


# --- running system ------------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace) -> int:
    from streams.runtime import run_broker

    return run_broker(_settings(args))


def cmd_worker(args: argparse.Namespace) -> int:
    from streams.runtime import run_worker

    return run_worker(_settings(args))


def cmd_up(args: argparse.Namespace) -> int:
    from projections.client import ClickHouseUnavailable
    from streams.runtime import run_up

    try:
        return run_up(_settings(args), demo=args.demo, demo_rate=args.demo_rate)
    except ClickHouseUnavailable as error:  # the embedded engine's directory cannot be opened (a server is retried)
        return _fail(str(error), 1)


def cmd_produce(args: argparse.Namespace) -> int:
    from streams.producer import produce_file

    settings = _settings(args)
    bootstrap = settings.kafka_bootstrap or _running(settings).get("kafka_bootstrap")
    if not bootstrap:
        return _fail("no broker: set LOYALTY_KAFKA_BOOTSTRAP or start `loyalty up` first")
    counts = produce_file(Path(args.file), bootstrap=bootstrap, topic=args.topic)
    if args.json:
        _print_json(counts)
    else:
        print(", ".join(f"{topic}: {count}" for topic, count in sorted(counts.items())))
    return 0


def _running(settings) -> dict[str, Any]:
    from streams.runtime import read_run_file

    return read_run_file(settings) or {}


def _query(args: argparse.Namespace, path: str, params: dict[str, Any] | None = None) -> Any:
    from streams.client import query_running_system

    return query_running_system(_settings(args), path, params or {})


def cmd_status(args: argparse.Namespace) -> int:
    document = _query(args, "/api/status")
    if args.json:
        _print_json(document)
        return 0
    print(
        f"events processed {document['events_processed']}, rejected {document['events_rejected']}, "
        f"ledger entries {document['ledger_entries_emitted']}, "
        f"projected {document['ledger_rows_projected']}"
    )
    for topic, lag in sorted(document.get("consumer_lag", {}).items()):
        print(f"  lag {topic}: {lag}")
    print(f"  projection backlog (ledger messages not yet in ClickHouse): {document.get('projection_backlog')}")
    print(f"  days whose dashboard aggregates wait for a recompute: {document.get('aggregate_days_pending')}")
    error = document.get("clickhouse_error") or document.get("projection_error")
    if error:
        print(f"  ClickHouse error: {error}")
    if document.get("ruleset_version"):
        print(f"  rule set in force: {document['ruleset_version']}")  # after an apply: the new one (docs/replay.md)
    return 0


def cmd_balance(args: argparse.Namespace) -> int:
    document = _query(args, customer_path(args.customer, "balance"))
    if args.json:
        _print_json(document)
    else:
        print(
            f"{document['customer_id']}: {document['balance']} available, {document['pending']} pending, "
            f"{document['lifetime_earned']} earned, {document['lifetime_redeemed']} redeemed, debt {document['debt']}"
        )
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    document = _query(args, customer_path(args.customer, "history"), {"limit": args.limit, "offset": args.offset})
    if args.json:
        _print_json(document)
        return 0
    for entry in document["entries"]:
        print(
            f"{entry['occurred_at']} #{entry['sequence']:<4} {entry['kind']:<20} {entry['source']:<13} "
            f"{entry['points']:+7d} -> {entry['balance_after']:>7}  {entry['rule_id']}: {entry['explanation']}"
        )
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    params = {
        "from": args.date_from,
        "to": args.date_to,
        "granularity": args.granularity,
        "by": args.by,
        "limit": args.limit,
    }
    document = _query(args, "/api/dashboard", {key: value for key, value in params.items() if value is not None})
    if args.json:
        _print_json(document)
        return 0
    from streams.dashboard_text import render_dashboard

    print(render_dashboard(document))
    return 0


def cmd_projections_migrate(args: argparse.Namespace) -> int:
    from clickhouse_connect.driver.exceptions import ClickHouseError

    from projections import connect, migrate
    from projections.schema import applied_versions

    settings = _settings(args)
    try:
        client = connect(settings.resolved_clickhouse_dsn())
    except ClickHouseError as error:
        reason = str(error).splitlines()[0][:300]
        return _fail(f"cannot open the ClickHouse database ({reason}); a chDB directory opens in one process only", 1)
    try:
        applied = migrate(client)
        current = sorted(applied_versions(client))
    finally:
        client.close()
    if args.json:
        _print_json({"applied": applied, "schema_versions": current})
    elif applied:
        print(f"applied migrations {', '.join(str(version) for version in applied)}; schema version {max(current)}")
    else:
        print(f"the schema is current (version {max(current) if current else 0}); nothing applied")
    return 0


def cmd_projections_rebuild(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if _running(settings):
        try:
            report = _post(args, "/api/projections/rebuild", {})
        except KeyboardInterrupt:
            return _fail("interrupted: the running system goes on with the rebuild and swaps the tables in", 130)
    else:
        from projections import connect
        from projections.rebuild import RebuildFailed, rebuild

        client = connect(settings.resolved_clickhouse_dsn())
        try:
            report = rebuild(client, progress=lambda message: sys.stderr.write(f"rebuild: {message}\n"))
        except RebuildFailed as error:
            return _fail(str(error), 1)
        except KeyboardInterrupt:
            return _fail("interrupted; a rebuild stopped before its swap leaves the live tables as they were", 130)
        finally:
            client.close()
    if args.json:
        _print_json(report)
        return 0
    print(f"rebuilt {report['days']} days in {report['seconds']} s ({report['swap']}):")
    for table, rows in report["tables"].items():
        print(f"  {table:<24} {rows['rows_before']:>10,} rows -> {rows['rows_after']:>10,}")
    return 0


def cmd_expiring(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    settings = _settings(args)
    if args.within_days < 0:
        return _fail("--within-days must be 0 or more")
    if _running(settings):
        # The running system counts from now under the rule set it runs: an option it cannot honour is refused,
        # not silently dropped (a reminder list "as of next month" must not come back as of today).
        offline_only = [name for name, value in (("--as-of", args.as_of), ("--rules", args.rules)) if value]
        if offline_only:
            return _fail(
                f"{' and '.join(offline_only)}: offline only; the running system counts from now under its own "
                "rule set (stop `loyalty up`, or use another --data-dir)"
            )
        if args.customer:
            document = _query(args, customer_path(args.customer, "expiring"), {"within_days": args.within_days})
        else:
            document = _query(args, "/api/expiring", {"within_days": args.within_days, "limit": min(args.limit, 1000)})
    else:
        from projections import connect, queries

        ruleset = load_ruleset(settings.rules)
        as_of = datetime.fromisoformat(args.as_of) if args.as_of else datetime.now(UTC)
        as_of = as_of if as_of.tzinfo else as_of.replace(tzinfo=UTC)
        found = []
        if ruleset.expiry.mode != "none":  # no expiry: nothing expires, as the running system answers
            client = connect(settings.resolved_clickhouse_dsn())
            try:
                found = queries.expiring_soon(
                    client,
                    as_of=as_of,
                    within_days=args.within_days,
                    mode=ruleset.expiry.mode,
                    days=ruleset.expiry.days,
                    limit=args.limit,
                    customer_id=args.customer,
                )
            finally:
                client.close()
        document = {
            "as_of": as_of.isoformat(),
            "within_days": args.within_days,
            "mode": ruleset.expiry.mode,
            "days": ruleset.expiry.days,
            "ruleset_version": ruleset.version,
            "customers": [
                {
                    "customer_id": item.customer_id,
                    "points": item.points,
                    "balance": item.balance,
                    "expires_at": item.expires_at.isoformat(),
                }
                for item in found
            ],
        }
    if args.json:
        _print_json(document)
        return 0
    if document["mode"] == "none":
        print(f"rule set {document.get('ruleset_version', '')} has no expiry (expiry.mode: none): nothing expires")
        return 0
    print(
        f"{len(document['customers'])} customers with points expiring within {document['within_days']} days "
        f"of {document['as_of']} (expiry by {document['mode']}, {document['days']} days)"
    )
    for item in document["customers"]:
        print(f"  {item['customer_id']:<24} {item['points']:>8} of {item['balance']:>8}  from {item['expires_at']}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from streams import replay

    if args.dry_run == args.apply:
        return _fail("say --dry-run or --apply")
    if args.customer is not None and (args.apply or args.since is not None or args.csv):
        return _fail("--customer previews one customer: it goes with --dry-run alone (not --apply, --since, --csv)")
    if args.processes is not None and not 0 <= args.processes <= replay.processes_max:
        return _fail(f"--processes must be in 0..{replay.processes_max} (0: the default), got {args.processes}")
    if args.lag_max is not None and args.dry_run:
        return _fail("--lag-max goes with --apply")
    if args.lag_max is not None and args.lag_max < 0:
        return _fail(f"--lag-max must be 0 or more, got {args.lag_max}")
    try:
        since = replay.parse_since(args.since) if args.since is not None else None  # "" is refused, not ignored
    except ValueError as error:
        return _fail(str(error))
    if args.csv and (problem := _unwritable(Path(args.csv))):
        return _fail(f"--csv {args.csv}: {problem}")  # before an apply, not after it
    rules_text = read_ruleset_text(args.rules)
    new_rules = parse_ruleset(rules_text, str(args.rules))
    settings = _settings(args)
    if args.customer is not None:
        return _replay_customer(args, settings, rules_text, new_rules)
    if _running(settings):
        body = {
            "rules": rules_text,
            "apply": args.apply,
            "since": since.isoformat() if since else None,
            "lag_max": replay.lag_bound_messages if args.lag_max is None else args.lag_max,
            "processes": args.processes,
        }
        if sys.stderr.isatty():  # the API answers once the replay is done: the bar comes from its progress route
            report = _post_replay_with_progress(args, body)
        else:
            report = _post(args, "/api/replay", body)
    else:
        from projections.archive import RawArchive
        from projections.client import connect
        from streams.settings import load_settings

        if args.apply:
            return _fail("--apply needs the running system (`loyalty up`): it checks the worker's lag first")
        # The live rule set (LOYALTY_RULES), not --rules: "before" is valued at the point value in force now.
        current = load_ruleset(load_settings().rules)
        client = connect(settings.resolved_clickhouse_dsn())

        terminal = sys.stderr.isatty()
        archived = RawArchive(client).estimate() if terminal else 0  # the bar's 100%: markers included, so about

        def progress(count: int) -> None:
            if terminal:
                _draw_replay_progress(count, archived)

        try:
            report = replay.dry_run(
                client,
                new_rules,
                current_point_value=current.redemption.point_value,
                since=since,
                progress=progress,
                processes=args.processes or settings.resolved_replay_processes(),
            )
        except replay.ReplayRefused as error:
            return _fail(f"replay refused: {error}")
        finally:
            if terminal:
                sys.stderr.write("\n")
        # The rule set in force is the last one an apply activated (as a restarted `loyalty up` takes it), if any.
        known, activated = replay.known_rulesets(client), replay.activated_versions(client)
        in_force = current
        if activated and activated[-1] in known:
            in_force = parse_ruleset(known[activated[-1]], f"version {activated[-1]}")
        conflict = replay.version_conflict(new_rules, known, in_force, activated)
        report["warnings"] = [f"--apply would refuse: {conflict}"] if conflict else []
        client.close()
    if since is not None and since > datetime.now(UTC):  # no customer is active since then: say why none is listed
        report.setdefault("warnings", []).append(f"--since {since.isoformat()} is in the future: no customer is listed")
    csv_error = None
    if args.csv:
        try:
            replay.write_csv(report, Path(args.csv))
        except OSError as error:  # the report (and an apply) stand: say so, then fail
            csv_error = f"--csv {args.csv}: {error.strerror or error}"
    code = _print_replay(report, args.json)
    if csv_error:
        return _fail(f"{csv_error}; the report above is complete" + (" and the apply was made" if args.apply else ""))
    return code


def _draw_replay_progress(count: int, estimate: int, phase: str = "replaying") -> None:
    """The replay's progress bar on the terminal (standard error), drawn over the line before; another phase than
    replaying (an apply waits for its markers first) is shown as text."""
    if phase == "replaying":
        share = min(1.0, count / estimate) if estimate else 0.0
        bar = "#" * round(share * progress_bar_width)
        line = f"replay [{bar:<{progress_bar_width}}] {share:4.0%}  {count:,} of ~{estimate:,} events"
    else:
        line = f"replay: {phase}"
    sys.stderr.write(f"\r{line}\x1b[K")  # \x1b[K: what a longer line before left is cleared
    sys.stderr.flush()


def _post_replay_with_progress(args: argparse.Namespace, body: dict) -> Any:
    """POST /api/replay in a thread while the progress route (GET /api/replay/progress) is asked every
    `progress_poll_s` and drawn; the bar's last state is the replay's final count. A running system without the route
    (an older one) answers 404: the bar is left out. Ctrl-C stops waiting; the running system finishes the replay."""
    import secrets
    import threading

    from streams.client import NotRunning, query_running_system

    body = {**body, "progress_id": secrets.token_hex(8)}
    outcome: dict[str, Any] = {}

    def post() -> None:
        try:
            outcome["report"] = _post(args, "/api/replay", body)
        except BaseException as error:  # raised again in the calling thread
            outcome["error"] = error

    thread = threading.Thread(target=post, name="replay-request", daemon=True)
    thread.start()
    settings, drawn = _settings(args), False

    def draw() -> None:
        nonlocal drawn
        try:
            run = query_running_system(settings, "/api/replay/progress", {"id": body["progress_id"]})
        except (NotRunning, OSError):
            return  # not started yet, an older running system, or a connection reset: the bar waits for the next
        _draw_replay_progress(run["events"], run["estimate"], run["phase"])
        drawn = True

    try:
        while thread.is_alive():
            thread.join(progress_poll_s)
            if thread.is_alive():
                draw()
        report = outcome.get("report")
        if drawn and report is not None and report.get("events_replayed") is not None:
            _draw_replay_progress(report["events_replayed"], report["events_replayed"])  # done: every event replayed
    finally:
        if drawn:
            sys.stderr.write("\n")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["report"]


def _unwritable(path: Path) -> str | None:
    """Why a file cannot be written at `path` (None: it can, as far as one can tell without writing it)."""
    if path.is_dir():
        return "is a directory"
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f"no directory {parent}"
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "not writable"
    return None


def _print_replay(report: dict, as_json: bool) -> int:
    if as_json:
        _print_json(report)
        return 0
    before, after = report["totals"]["before"], report["totals"]["after"]
    print(
        f"replayed {report['events_replayed']:,} events under {report['ruleset_version_new']} "
        f"(live: {', '.join(report['ruleset_versions_live'])}); {report.get('events_rejected', 0):,} rejected"
    )
    print(f"  issued      {before['issued']:>12,} -> {after['issued']:>12,}")
    print(f"  outstanding {before['outstanding']:>12,} -> {after['outstanding']:>12,}")
    print(f"  liability   {before['liability']:>12} -> {after['liability']:>12}")
    changed, losing = report["customers_changed"], len(report["customers_losing_points"])
    active = f" (of the customers active since {report['since']})" if report.get("since") else ""
    print(f"  customers changed {changed:,}, losing points {losing:,}{active}")
    for row in sorted(report["per_rule"], key=lambda row: -abs(row["delta"]))[:15]:
        if row["delta"]:
            print(f"  {row['rule_id']:<40} {row['points_before']:>10,} -> {row['points_after']:>10,}")
    if "applied" in report:
        print(
            f"applied: {report['applied']['compensations_published']} compensating adjustments at "
            f"{report['applied']['cut_over']}"
        )
        steps = report["applied"].get("after_markers_s")
        if steps:
            shown = ", ".join(f"{step.replace('_', ' ')} {seconds:.1f} s" for step, seconds in steps.items())
            print(f"  after the markers: {shown}")
    for warning in report.get("warnings", ()):
        print(f"warning: {warning}")
    if report.get("archive_gaps"):
        from projections.archive import describe_gaps

        gaps = describe_gaps(tuple(gap) for gap in report["archive_gaps"])
        print(f"warning: the raw archive misses messages ({gaps}): these figures leave their events out")
    return 0


def _replay_customer(args: argparse.Namespace, settings, rules_text: str, new_rules) -> int:
    """`loyalty replay --rules NEW --dry-run --customer C`: the customer's history, event by event, before/after."""
    from streams import replay

    if _running(settings):
        preview = _post(args, "/api/replay", {"rules": rules_text, "customer": args.customer})
    else:
        from projections.client import connect

        client = connect(settings.resolved_clickhouse_dsn())
        try:
            preview = replay.preview_customer(client, new_rules, args.customer)
        finally:
            client.close()
    if args.json:
        _print_json(preview)
        return 0
    print(
        f"customer {preview['customer_id']} under {preview['ruleset_version_new']} "
        f"(live: {', '.join(preview['ruleset_versions_live']) or 'no entries'}): balance "
        f"{preview['balance_before']:,} -> {preview['balance_after']:,} ({preview['delta']:+,}), "
        f"{preview['events_replayed']:,} events replayed"
        # An event that made no entry live or under the new rules (a clock tick with nothing to do) has no row.
        + (f", {len(preview['events']):,} with entries" if len(preview["events"]) != preview["events_replayed"] else "")
    )
    print(f"  {'occurred at (UTC)':<19} {'event':<24} {'live':>7} {'new':>7} {'delta':>7} {'pending':>15}  rules (new)")
    for row in preview["events"]:
        pending = f"{row['pending_points_before']:,}/{row['pending_points_after']:,}"
        print(
            f"  {row['occurred_at'][:19].replace('T', ' '):<19} {row['event_type']:<24} {row['points_before']:>7,} "
            f"{row['points_after']:>7,} {row['delta']:>+7,} {pending:>15}  {', '.join(row['rules_after'])}"
        )
    return 0


def _post(args: argparse.Namespace, path: str, body: dict) -> Any:
    from streams.client import post_running_system

    return post_running_system(_settings(args), path, body)


def cmd_bench(args: argparse.Namespace) -> int:
    from streams.bench import BenchOptions, format_table, run_bench

    def progress(message: str) -> None:
        sys.stderr.write(f"bench: {message}\n")
        sys.stderr.flush()

    chosen = {
        "events": args.events,
        "customers": args.customers,
        "partitions": args.partitions,
        "baseline_events": args.baseline_events,
        "ledger_rows": args.ledger_rows,
        "query_customers": args.query_customers,
        "latency_rate": args.latency_rate,
        "latency_seconds": args.latency_seconds,
        "memory_customers": args.memory_customers,
    }
    if args.small:
        options = BenchOptions.small_run(**chosen)
    else:
        options = BenchOptions(**{name: value for name, value in chosen.items() if value is not None})
    options.progress = progress
    figures = run_bench(options, profile=args.profile)
    if args.json:
        _print_json(figures)
    else:
        print(format_table(figures))
    return 0


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loyalty", description="Event-sourced loyalty points engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    def system_options(sub: argparse.ArgumentParser) -> None:
        # The running system is found through <data dir>/run.json (its address and token), so the data
        # directory is the only option a client command needs; the API's port is an option of `up` alone.
        sub.add_argument("--data-dir", type=Path, help="data directory (LOYALTY_DATA_DIR)")

    sub = command("process", cmd_process, "Apply a JSONL event log offline (the batch driver).")
    sub.add_argument("events", help="JSONL file of events")
    sub.add_argument("--rules", type=Path, help="rule set YAML (default: the packaged default)")
    sub.add_argument("--json", action="store_true")

    rules = commands.add_parser("rules", help="Validate and explain rule sets.")
    rules_commands = rules.add_subparsers(dest="rules_command", required=True)
    sub = rules_commands.add_parser("validate", help="Validate a rule set file.")
    sub.add_argument("file", type=Path)
    sub.add_argument("--json", action="store_true")
    sub.set_defaults(handler=cmd_rules_validate)
    sub = rules_commands.add_parser("explain", help="Explain the entries events would produce.")
    sub.add_argument("events", help="an event as JSON, or a JSONL file")
    sub.add_argument("--rules", type=Path)
    sub.add_argument("--json", action="store_true")
    sub.set_defaults(handler=cmd_rules_explain)

    schemas = commands.add_parser("schemas", help="Event contract tools.")
    schemas_commands = schemas.add_subparsers(dest="schemas_command", required=True)
    sub = schemas_commands.add_parser("export", help="Write the JSON Schema of every event and the ledger entry.")
    sub.add_argument("directory")
    sub.set_defaults(handler=cmd_schemas_export)

    sub = command("simulate", cmd_simulate, "Generate realistic synthetic traffic as JSONL.")
    sub.add_argument("--events", type=int, default=10_000)
    sub.add_argument("--customers", type=int, default=1_000)
    sub.add_argument("--seed", type=int, default=1)
    sub.add_argument("--stores", type=int, default=1)
    sub.add_argument("--duplicate-share", type=float, default=0.02)
    sub.add_argument("--bad-share", type=float, default=0.0)
    sub.add_argument("--mean-gap-seconds", type=float, default=30.0, help="mean event-time gap between events")
    sub.add_argument(
        "--disputed-referral-share",
        type=float,
        default=0.0,
        help="share of referrals followed by one the referee's side refuses (already referred, no such order)",
    )
    sub.add_argument("--out", help="file to write (default: standard output)")

    sub = command("broker", cmd_broker, "Run the embedded Kafka-compatible broker (Tansu) in the foreground.")
    sub.add_argument("--partitions", type=int)  # no --data-dir: the broker keeps its log in memory

    sub = command("worker", cmd_worker, "Run the stream worker (needs LOYALTY_KAFKA_BOOTSTRAP).")
    sub.add_argument("--rules", type=Path)
    sub.add_argument("--partitions", type=int)
    system_options(sub)

    sub = command("up", cmd_up, "Run the whole pipeline on embedded defaults (broker if needed, worker, projections).")
    sub.add_argument("--demo", action="store_true", help="also stream synthetic traffic")
    sub.add_argument("--demo-rate", type=float, default=200.0, help="demo events per second")
    sub.add_argument("--rules", type=Path)
    sub.add_argument("--partitions", type=int)
    system_options(sub)
    sub.add_argument(
        "--port", type=int, help="port the API and dashboard serve on (LOYALTY_HTTP_PORT, default 8787; 0: a free one)"
    )

    sub = command("produce", cmd_produce, "Publish a JSONL file, each line routed by event_type, keyed by customer.")
    sub.add_argument("file")
    sub.add_argument("--topic", help="publish every line to this topic instead")
    sub.add_argument("--json", action="store_true")
    system_options(sub)

    sub = command("replay", cmd_replay, "Preview or apply a new rule set on the archived history.")
    sub.add_argument("--rules", required=True, type=Path, help="the new rule set YAML")
    sub.add_argument("--dry-run", action="store_true", help="report what would change; change nothing")
    sub.add_argument("--apply", action="store_true", help="post compensating adjustments through the worker")
    sub.add_argument(
        "--since",
        help="report only customers active since this date or time (ISO 8601: 2026-05-16, 2026-05-16T12:00+02:00)",
    )
    sub.add_argument("--csv", help="also write the per-customer diff to this CSV file")
    sub.add_argument("--customer", help="preview one customer: their history event by event, live and new")
    sub.add_argument(
        "--lag-max", type=int, help="refuse --apply when the worker lags by more input messages (default 10000)"
    )
    sub.add_argument(
        "--processes",
        type=int,
        help="processes to decide customers in (0 or unset: LOYALTY_REPLAY_PROCESSES, by default one per CPU)",
    )
    sub.add_argument("--json", action="store_true")
    system_options(sub)

    sub = command("status", cmd_status, "Consumer lag and counters of the running system.")
    sub.add_argument("--json", action="store_true")
    system_options(sub)

    sub = command("balance", cmd_balance, "A customer's balance.")
    sub.add_argument("customer")
    sub.add_argument("--json", action="store_true")
    system_options(sub)

    sub = command("history", cmd_history, "A customer's point history.")
    sub.add_argument("customer")
    sub.add_argument("--limit", type=int, default=200)
    sub.add_argument("--offset", type=int, default=0, help="skip this many entries (oldest first)")
    sub.add_argument("--json", action="store_true")
    system_options(sub)

    sub = command("dashboard", cmd_dashboard, "The four dashboard sections.")
    sub.add_argument("--from", dest="date_from")
    sub.add_argument("--to", dest="date_to")
    sub.add_argument("--granularity", choices=["day", "week", "month"], default="day")
    sub.add_argument(
        "--by", choices=["source", "rule", "product", "category"], default="source", help="point sources grouped by"
    )
    sub.add_argument("--limit", type=int, default=10, help="top earning customers shown (at most 100)")
    sub.add_argument("--json", action="store_true")
    system_options(sub)

    sub = command("bench", cmd_bench, "Measure throughput, latency and memory on the embedded broker and chDB.")
    sub.add_argument("--events", type=int, help="events in the simulated log (default 1,000,000; --small 20,000)")
    sub.add_argument("--customers", type=int, help="customer pool of the log (default 1,000,000; --small 2,000)")
    sub.add_argument("--small", action="store_true", help="the quick correctness run CI uses (about 20,000 events)")
    sub.add_argument("--partitions", type=int, help="partitions of every topic (default 4)")
    sub.add_argument("--baseline-events", type=int, help="events for the Faust baseline (default 50,000)")
    sub.add_argument("--ledger-rows", type=int, help="synthetic ledger rows for the query figures (default 10M)")
    sub.add_argument("--query-customers", type=int, help="customers of the synthetic ledger (default 1M)")
    sub.add_argument("--latency-rate", type=float, help="events/s of the latency run (default 5,000)")
    sub.add_argument("--latency-seconds", type=float, help="length of the latency run (default 30)")
    sub.add_argument(
        "--memory-customers",
        type=int,
        help="customers whose states a worker restores for the memory figure (default 1,000,000; --small 2,000)",
    )
    sub.add_argument("--profile", help="write a py-spy raw profile of the worker drain to this file")
    sub.add_argument("--json", action="store_true")

    projections = commands.add_parser("projections", help="ClickHouse projections tools.")
    projections_commands = projections.add_subparsers(dest="projections_command", required=True)
    sub = projections_commands.add_parser(
        "migrate",
        help="Apply the schema migrations not applied yet to the ClickHouse database of the settings.",
    )
    sub.add_argument("--data-dir", type=Path, help="data directory (LOYALTY_DATA_DIR)")
    sub.add_argument("--clickhouse-dsn", help="ClickHouse DSN (LOYALTY_CLICKHOUSE_DSN)")
    sub.add_argument("--json", action="store_true")
    sub.set_defaults(handler=cmd_projections_migrate)
    sub = projections_commands.add_parser(
        "rebuild",
        help="Recompute every table derived from the ledger and swap it in atomically "
        "(through the running system when there is one).",
    )
    system_options(sub)
    sub.add_argument("--clickhouse-dsn", help="ClickHouse DSN (LOYALTY_CLICKHOUSE_DSN)")
    sub.add_argument("--json", action="store_true")
    sub.set_defaults(handler=cmd_projections_rebuild)

    sub = command("expiring", cmd_expiring, "Customers with points expiring within N days (reminder e-mails).")
    sub.add_argument("--within-days", type=int, required=True, help="the horizon, in days from --as-of")
    sub.add_argument("--customer", help="only this customer")
    sub.add_argument("--as-of", help="the moment to count from (ISO 8601, default: now; offline only)")
    sub.add_argument("--limit", type=int, default=1000, help="at most this many customers (at most 1000 while running)")
    sub.add_argument(
        "--rules", type=Path, help="rule set YAML whose expiry settings apply (LOYALTY_RULES; offline only)"
    )
    sub.add_argument("--clickhouse-dsn", help="ClickHouse DSN (LOYALTY_CLICKHOUSE_DSN)")
    sub.add_argument("--json", action="store_true")
    system_options(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except RuleSetInvalid as error:
        return _fail(str(error))
    except RuntimeError as error:  # NotRunning, BrokerError: a message for the operator, not a traceback
        return _fail(str(error))
    except FileNotFoundError as error:
        return _fail(f"{error.filename}: no such file")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
