# dlqd's container image: `docker build -t dlqd .`
# Stage 1 builds the wheel and a virtual environment with the locked runtime
# dependencies (requirements/runtime.lock, hashes checked); stage 2 is a slim
# Python with that environment only: no compiler, no pip cache, no sources.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY requirements/runtime.lock requirements/runtime.lock
COPY pyproject.toml README.md ./
COPY scripts/install-venv scripts/install-venv
COPY dlqd dlqd
COPY sql sql
RUN scripts/install-venv /opt/dlqd

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="dlqd" \
      org.opencontainers.image.description="Dead-letter-queue daemon for Postgres-backed job systems" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="https://github.com/dlqd/dlqd/blob/main/docs/deployment.md" \
      org.opencontainers.image.source="https://github.com/dlqd/dlqd"
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin dlqd
COPY --from=build /opt/dlqd /opt/dlqd
ENV PATH=/opt/dlqd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DLQD_METRICS_HOST=0.0.0.0 \
    DLQD_METRICS_PORT=9464
USER 10001:10001
EXPOSE 9464
# /healthz answers while the event loop runs; readiness (/readyz) is the orchestrator's
HEALTHCHECK --interval=30s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2)"]
ENTRYPOINT ["dlqd"]
CMD ["run"]
