"""The deployment files are consistent: docker-compose.yml, Dockerfile and the ClickHouse users (no Docker needed)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

import pytest
import yaml

from streams.settings import Settings

REPOSITORY = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPOSITORY / "docker-compose.yml"
DOCKERFILE = REPOSITORY / "Dockerfile"
CLICKHOUSE_USERS = REPOSITORY / "deploy" / "clickhouse" / "users.d" / "loyalty.xml"
CLICKHOUSE_CONFIG = REPOSITORY / "deploy" / "clickhouse" / "config.d" / "loyalty.xml"

SETTINGS_VARIABLES = {f"LOYALTY_{name.upper()}" for name in Settings.model_fields}
DEPENDENCY_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def environment_of(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {name: str(value) for name, value in environment.items()}


def dependencies_of(service: dict) -> dict[str, str]:
    depends_on = service.get("depends_on") or {}
    if isinstance(depends_on, list):
        return dict.fromkeys(depends_on, "service_started")
    return {name: options.get("condition", "service_started") for name, options in depends_on.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def test_compose_file_has_the_five_services(services: dict) -> None:
    assert set(services) == {"kafka", "clickhouse", "topics", "worker", "projector"}


def test_every_image_is_pinned_to_a_version_tag(services: dict) -> None:
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and re.match(r"^\d+(\.\d+)+", tag), f"{name}: image {image!r} is not pinned"
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")


def test_dockerfile_base_image_is_a_pinned_slim_python_311() -> None:
    arguments = dict(
        argument.split("=", 1)
        for keyword, argument in dockerfile_instructions()
        if keyword == "ARG" and "=" in argument
    )
    base_images = [argument.split()[0] for keyword, argument in dockerfile_instructions() if keyword == "FROM"]
    resolved = {arguments.get(image.strip("${}"), image) for image in base_images}
    assert resolved == {"python:3.11.13-slim-bookworm"}


def test_every_service_has_a_health_check_or_is_a_one_shot_job_others_wait_for(services: dict) -> None:
    awaited_to_complete = {
        target
        for service in services.values()
        for target, condition in dependencies_of(service).items()
        if condition == "service_completed_successfully"
    }
    for name, service in services.items():
        healthcheck = service.get("healthcheck") or {}
        if healthcheck.get("disable"):
            assert service.get("restart") == "no", f"{name}: a job without a health check must not restart"
            assert name in awaited_to_complete, f"{name}: a one-shot job must be awaited to complete"
        else:
            assert healthcheck.get("test"), f"{name}: no health check"
            assert healthcheck["test"][0] in ("CMD", "CMD-SHELL"), name


def test_long_running_services_restart_and_are_awaited_healthy(services: dict) -> None:
    for name, service in services.items():
        if name != "topics":
            assert service.get("restart") == "unless-stopped", name
    assert dependencies_of(services["topics"]) == {"kafka": "service_healthy"}
    assert dependencies_of(services["worker"]) == {
        "kafka": "service_healthy",
        "topics": "service_completed_successfully",
    }
    assert dependencies_of(services["projector"]) == {
        "kafka": "service_healthy",
        "clickhouse": "service_healthy",
        "topics": "service_completed_successfully",
    }


def test_depends_on_targets_exist_and_conditions_are_valid(services: dict) -> None:
    for name, service in services.items():
        for target, condition in dependencies_of(service).items():
            assert target in services and target != name, f"{name} depends on unknown {target}"
            assert condition in DEPENDENCY_CONDITIONS, f"{name}: {condition}"


def test_every_loyalty_variable_is_a_settings_field(services: dict) -> None:
    used: set[str] = set()
    for name, service in services.items():
        for variable in environment_of(service):
            if variable.startswith("LOYALTY_"):
                assert variable in SETTINGS_VARIABLES, f"{name}: {variable} is not a field of streams.settings.Settings"
                used.add(variable)
    dockerfile_variables = {
        pair.split("=", 1)[0]
        for keyword, arguments in dockerfile_instructions()
        if keyword == "ENV"
        for pair in arguments.split()
    }
    assert {variable for variable in dockerfile_variables if variable.startswith("LOYALTY_")} <= SETTINGS_VARIABLES
    assert {"LOYALTY_KAFKA_BOOTSTRAP", "LOYALTY_PARTITIONS", "LOYALTY_CLICKHOUSE_DSN", "LOYALTY_RUN_WORKER"} <= used


def test_engine_services_share_one_configuration(services: dict) -> None:
    worker, projector, topics = (environment_of(services[name]) for name in ("worker", "projector", "topics"))
    for variable in ("LOYALTY_KAFKA_BOOTSTRAP", "LOYALTY_PARTITIONS", "LOYALTY_WORKER_ID"):
        assert worker[variable] == projector[variable] == topics[variable], variable
    assert projector["LOYALTY_RUN_WORKER"] == "false"
    assert worker["LOYALTY_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert projector["LOYALTY_CLICKHOUSE_DSN"].startswith("http://loyalty:")
    assert projector["LOYALTY_CLICKHOUSE_DSN"].endswith("@clickhouse:8123/loyalty")


def test_worker_can_be_scaled(services: dict) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker, "fixed host ports would collide with --scale worker=N"
    assert worker["command"] == ["worker"]
    assert environment_of(worker)["LOYALTY_METRICS_PORT"] == "9108"
    assert "9108" in [str(port) for port in worker.get("expose", [])]


def test_host_ports_are_loopback_and_do_not_collide(services: dict) -> None:
    published: list[tuple[str, str]] = []
    for name, service in services.items():
        for port in service.get("ports", []):
            parts = str(port).split(":")
            assert len(parts) == 3, f"{name}: publish {port!r} as 127.0.0.1:HOST:CONTAINER"
            address, host_port, _ = parts
            assert address == "127.0.0.1", f"{name}: {port!r} is not bound to loopback"
            published.append((address, host_port))
    duplicates = [binding for binding, count in Counter(published).items() if count > 1]
    assert not duplicates
    assert published


def test_named_volumes_are_declared_and_used(compose: dict, services: dict) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (REPOSITORY / source).exists(), f"{name}: bind mount {source} does not exist"
                assert str(volume).endswith(":ro"), f"{name}: configuration mounts are read-only"
            else:
                assert source in declared, f"{name}: volume {source} is not declared at top level"
                used.add(source)
    assert used == declared
    assert {"kafka-data", "clickhouse-data"} <= declared


def test_kafka_runs_in_kraft_mode_without_auto_created_topics(services: dict) -> None:
    environment = environment_of(services["kafka"])
    assert environment["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "zookeeper" not in " ".join(environment).lower()
    assert environment["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "INTERNAL://kafka:9092" in environment["KAFKA_ADVERTISED_LISTENERS"]


def test_kafka_never_expires_the_ledger_that_worker_state_is_rebuilt_from(services: dict) -> None:
    environment = environment_of(services["kafka"])
    assert environment["KAFKA_LOG_RETENTION_MS"] == "-1"
    assert environment["KAFKA_LOG_RETENTION_BYTES"] == "-1"
    assert "KAFKA_LOG_RETENTION_HOURS" not in environment and "KAFKA_LOG_CLEANUP_POLICY" not in environment


def test_topics_job_runs_the_topic_creation_script(services: dict) -> None:
    topics = services["topics"]
    assert topics["entrypoint"] == ["python", "/opt/loyalty/create_topics.py"]
    copies = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "COPY"]
    assert any("deploy/create_topics.py" in arguments and "/opt/loyalty/" in arguments for arguments in copies)
    assert any("deploy/healthcheck.py" in arguments for arguments in copies)


def test_dockerfile_installs_the_package_and_runs_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    runs = " ".join(arguments for keyword, arguments in instructions if keyword == "RUN")
    assert re.search(r"pip wheel [^&]*\.", runs) and "pip install" in runs and "loyalty-engine" in runs
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users, "no USER instruction"
    final_user = users[-1].split(":")[0]
    assert final_user not in ("root", "0")
    entrypoint = [arguments for keyword, arguments in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint == ['["loyalty"]']


def test_clickhouse_analyst_user_is_read_only_and_limited_to_the_loyalty_database() -> None:
    root = ElementTree.parse(CLICKHOUSE_USERS).getroot()
    analyst = root.find("users/analyst")
    assert analyst is not None
    profile = analyst.findtext("profile")
    assert root.findtext(f"profiles/{profile}/readonly") == "1"
    assert [database.text for database in analyst.findall("allow_databases/database")] == ["loyalty"]
    assert analyst.find("password").get("from_env") == "CLICKHOUSE_ANALYST_PASSWORD"
    assert analyst.findtext("access_management") == "0"


def test_clickhouse_writer_user_is_the_one_in_the_projector_dsn(services: dict) -> None:
    root = ElementTree.parse(CLICKHOUSE_USERS).getroot()
    writer = root.find("users/loyalty")
    assert writer is not None
    assert root.findtext(f"profiles/{writer.findtext('profile')}/readonly") in (None, "0")
    assert writer.find("password").get("from_env") == "CLICKHOUSE_WRITER_PASSWORD"
    clickhouse_environment = environment_of(services["clickhouse"])
    assert {"CLICKHOUSE_WRITER_PASSWORD", "CLICKHOUSE_ANALYST_PASSWORD"} <= set(clickhouse_environment)
    assert "${CLICKHOUSE_WRITER_PASSWORD:?" in environment_of(services["projector"])["LOYALTY_CLICKHOUSE_DSN"]


def test_clickhouse_backup_disk_is_configured() -> None:
    root = ElementTree.parse(CLICKHOUSE_CONFIG).getroot()
    assert root.findtext("backups/allowed_disk") == "backups"
    assert root.findtext("storage_configuration/disks/backups/type") == "local"
