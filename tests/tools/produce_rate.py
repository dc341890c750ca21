"""How fast `loyalty produce` (kafka-python, streams/producer.py) publishes a simulated log to an embedded broker.

    python tests/tools/produce_rate.py [--events 100000] [--customers 20000] [--partitions 4] [--pure-python-crc]

`--pure-python-crc` hides the `crc32c` package, so kafka-python checksums record batches with its pure-Python
fallback (as it did before `crc32c` was a dependency). Prints one JSON line. A measuring tool for
docs/performance.md, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--pure-python-crc", action="store_true")
    args = parser.parse_args()
    if args.pure_python_crc:
        sys.modules["crc32c"] = None  # type: ignore[assignment]  # an import of it now raises ImportError
    from kafka.record import util

    from schemas.topics import ALL_TOPICS
    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.producer import make_producer, produce_lines
    from streams.simulate import generate_events

    lines = [line.encode() for line in generate_events(events=args.events, customers=args.customers, seed=8)]
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, list(ALL_TOPICS), args.partitions)
        producer = make_producer(broker.bootstrap)
        try:
            began = time.perf_counter()
            messages = sum(produce_lines(producer, lines).values())
            elapsed = time.perf_counter() - began
        finally:
            producer.close()
    checksum = util.calc_crc32c.__defaults__[0]
    print(json.dumps({
        "crc32c": f"{checksum.__module__}.{checksum.__name__}",
        "messages": messages,
        "seconds": round(elapsed, 2),
        "messages_per_s": round(messages / elapsed),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
