"""The topic-creation job of docker-compose.yml: every loyalty topic with LOYALTY_PARTITIONS partitions.

Idempotent (`streams.broker.ensure_topics`): existing topics with the configured partition count are kept,
a topic with a different count is an error (exit 1), because keyed routing and the copartitioning of the
five input topics and the ledger rely on one partition count. Configured only by LOYALTY_* variables.
"""

from __future__ import annotations

import sys

from schemas.topics import ALL_TOPICS
from streams.broker import ensure_topics
from streams.settings import load_settings


def main() -> int:
    settings = load_settings()
    if not settings.kafka_bootstrap:
        sys.stderr.write("create_topics: set LOYALTY_KAFKA_BOOTSTRAP\n")
        return 2
    try:
        counts = ensure_topics(
            settings.kafka_bootstrap,
            ALL_TOPICS,
            settings.partitions,
            replication_factor=settings.topic_replication_factor,
        )
    except Exception as error:  # BrokerError (wrong partition count, timeout) or an admin client error
        sys.stderr.write(f"create_topics: {error}\n")
        return 1
    for topic, partitions in sorted(counts.items()):
        print(f"{topic}: {partitions} partitions", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
