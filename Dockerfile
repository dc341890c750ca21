# The loyalty engine image: one image, every role (worker, projector + API, topic creation), chosen by the
# command. Build: docker build -t loyalty-engine .   Run: docker run --rm loyalty-engine --help
#
# Python 3.11 on Debian bookworm, slim, pinned to a patch release (bump deliberately, rebuild, run the tests).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- build: wheels of the package and every dependency (a compiler only here, never in the runtime image)
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY streams ./streams
COPY projections ./projections
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOYALTY_DATA_DIR=/var/lib/loyalty
RUN groupadd --system --gid 10001 loyalty \
    && useradd --system --uid 10001 --gid loyalty --home-dir /var/lib/loyalty --shell /usr/sbin/nologin loyalty \
    && mkdir -p /var/lib/loyalty \
    && chown loyalty:loyalty /var/lib/loyalty
COPY --from=build /wheels /tmp/wheels
# Installs the package (pip install . was built into a wheel above) with the exact dependency wheels.
RUN pip install --no-cache-dir --no-index --find-links=/tmp/wheels loyalty-engine \
    && rm -rf /tmp/wheels
COPY deploy/create_topics.py deploy/healthcheck.py /opt/loyalty/
# Faust writes its <app id>-data directory into the working directory: it must belong to the user.
WORKDIR /var/lib/loyalty
USER 10001:10001
# 8787: HTTP API and dashboard (projector service); 9108: Prometheus /metrics (LOYALTY_METRICS_PORT).
EXPOSE 8787 9108
# The default command is a worker with its metrics endpoint; docker-compose.yml sets each service's own check.
ENV LOYALTY_METRICS_HOST=0.0.0.0 \
    LOYALTY_METRICS_PORT=9108
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/loyalty/healthcheck.py", "http://127.0.0.1:9108/metrics"]
ENTRYPOINT ["loyalty"]
CMD ["worker"]
