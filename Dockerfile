# syntax=docker/dockerfile:1
# The buildfleet image: `buildfleet worker` (default) or `buildfleet gateway`.
#
#   docker build -t buildfleet:0.1.0 .
#   docker run --rm -e BUILDFLEET_REDIS_URL=redis://... buildfleet:0.1.0 worker
#   docker run --rm -p 8080:8080 -e BUILDFLEET_GATEWAY_HOST=0.0.0.0 ... buildfleet:0.1.0 gateway
#
# Base images are pinned by tag only: digests could not be resolved where this file was
# written (no registry access). Before production use, pin each FROM by digest
# (`crane digest golang:1.24-bookworm`, `crane digest python:3.11-slim-bookworm`) and let a
# bot (Renovate/Dependabot) keep the digests fresh.
#
# Nothing secret is baked in: the Redis URL, API tokens, webhook secrets, registry
# credentials and BuildKit client certificates all come from the environment or mounted
# Secrets at run time (see deploy/README.md).

ARG BUILDKIT_VERSION=v0.34.2

# --- buildctl, built from the Go module proxy exactly as scripts/lib.sh does ----------------
FROM golang:1.24-bookworm AS buildctl
ARG BUILDKIT_VERSION
ENV BUILDKIT_MODULE=github.com/moby/buildkit \
    GOFLAGS=-mod=mod \
    CGO_ENABLED=0 \
    GOWORK=off
WORKDIR /src
# buildkit's go.mod has an `exclude` block, so `go install pkg@version` refuses it: download
# the module, build from a writable copy without its (partial) vendor/ directory.
RUN set -eux; \
    dir="$(go mod download -json "${BUILDKIT_MODULE}@${BUILDKIT_VERSION}" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"; \
    test -n "${dir}" && test -d "${dir}"; \
    cp -r "${dir}" /src/buildkit; \
    chmod -R u+w /src/buildkit; \
    rm -rf /src/buildkit/vendor; \
    cd /src/buildkit; \
    go build -mod=mod -trimpath \
        -ldflags "-s -w -X ${BUILDKIT_MODULE}/version.Version=${BUILDKIT_VERSION}" \
        -o /out/buildctl ./cmd/buildctl; \
    /out/buildctl --version

# --- the Python wheel, built apart so the runtime stage has no build tooling -------------
FROM python:3.11-slim-bookworm AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY buildfleet ./buildfleet
COPY producer ./producer
COPY worker ./worker
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime ------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime
ARG BUILDKIT_VERSION
LABEL org.opencontainers.image.title="buildfleet" \
      org.opencontainers.image.description="Queue-driven fleet of container build workers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.buildfleet.buildkit.version="${BUILDKIT_VERSION}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BUILDFLEET_CONFIG=/etc/buildfleet/buildfleet.toml \
    DOCKER_CONFIG=/etc/buildfleet/docker
# python:3.11-slim already has ca-certificates (TLS to Redis, registries, OTLP); git sources
# are fetched by BuildKit itself, so the image needs no git.
RUN set -eux; \
    groupadd --system --gid 10001 buildfleet; \
    useradd --system --uid 10001 --gid 10001 --home-dir /home/buildfleet --create-home \
        --shell /usr/sbin/nologin buildfleet; \
    mkdir -p /etc/buildfleet
COPY --from=buildctl /out/buildctl /usr/local/bin/buildctl
# The project and its runtime dependencies only (no `[test]` extra).
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install /wheels/*.whl && buildfleet --help >/dev/null
COPY config/buildfleet.toml /etc/buildfleet/buildfleet.toml
USER 10001:10001
WORKDIR /home/buildfleet
# 8080: the gateway; 9464: a worker's /metrics, /healthz, /readyz ([worker].metrics_port).
EXPOSE 8080 9464
# buildfleet runs as PID 1: it installs its own SIGTERM handler (the worker drains, the
# gateway stops accepting) and awaits every buildctl child, so no init is needed.
ENTRYPOINT ["buildfleet"]
CMD ["worker"]
