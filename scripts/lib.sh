# shellcheck shell=bash
# Shared helpers for scripts/setup and scripts/test. Source it; do not run it.

# shellcheck source=buildfleet/versions.env
source "$(dirname "${BASH_SOURCE[0]}")/../buildfleet/versions.env"
BUILDKIT_MODULE="github.com/moby/buildkit"
export PATH="/usr/local/go/bin:${PATH}"
BUILDFLEET_TOOLS="${BUILDFLEET_TOOLS:-${HOME}/.cache/buildfleet/tools}"
BUILDKIT_BIN="${BUILDFLEET_TOOLS}/buildkit-${BUILDKIT_VERSION}/bin"
# The trace receiver with a web UI that `buildfleet up` and the tests run. Jaeger v2 would
# be the first choice, but its Go module carries only a placeholder UI (the real one is
# built with npm from another repository); otel-desktop-viewer embeds its UI.
TRACE_VIEWER_MODULE="github.com/CtrlSpice/otel-desktop-viewer"
TRACE_VIEWER_BIN="${BUILDFLEET_TOOLS}/otel-desktop-viewer-${TRACE_VIEWER_VERSION}/bin"

step() { printf '==> %s\n' "$*"; }
die() { printf 'setup FAILED: %s\n' "$*" >&2; exit 1; }

buildkit_present() {
    [[ -x "${BUILDKIT_BIN}/buildkitd" && -x "${BUILDKIT_BIN}/buildctl" ]]
}

# build_buildkit: build buildkitd + buildctl from the Go module proxy into BUILDKIT_BIN.
# buildkit's go.mod has an `exclude` block, so `go install pkg@version` refuses it; build
# from a writable copy of the module instead, without its (partial) vendor/ directory.
build_buildkit() {
    buildkit_present && return 0
    command -v go >/dev/null || { echo "go not found (expected /usr/local/go/bin/go)"; return 1; }
    local dir work prefix
    dir="$(GOFLAGS=-mod=mod go mod download -json "${BUILDKIT_MODULE}@${BUILDKIT_VERSION}" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [[ -n "${dir}" && -d "${dir}" ]] || { echo "go mod download gave no Dir"; return 1; }
    prefix="${BUILDFLEET_TOOLS}/buildkit-${BUILDKIT_VERSION}"
    work="${prefix}/src.partial"
    rm -rf "${work}" "${prefix}/bin.partial"
    mkdir -p "${prefix}"
    cp -r "${dir}" "${work}"
    chmod -R u+w "${work}"
    rm -rf "${work}/vendor"
    (cd "${work}" && CGO_ENABLED=0 GOWORK=off go build -mod=mod -trimpath \
        -ldflags "-X ${BUILDKIT_MODULE}/version.Version=${BUILDKIT_VERSION}" \
        -o "${prefix}/bin.partial/" ./cmd/buildkitd ./cmd/buildctl) || return 1
    rm -rf "${BUILDKIT_BIN}"
    mv "${prefix}/bin.partial" "${BUILDKIT_BIN}"
    rm -rf "${work}"
}

trace_viewer_present() { [[ -x "${TRACE_VIEWER_BIN}/otel-desktop-viewer" ]]; }

# build_trace_viewer: otel-desktop-viewer from the Go module proxy into TRACE_VIEWER_BIN.
# `go install MOD@VERSION` fails here (the proxy refuses the module's version list, which
# install reads for deprecation notices), so build from a writable copy of the module, as
# for BuildKit. CGO: its store is DuckDB, linked from the prebuilt library its module ships.
build_trace_viewer() {
    trace_viewer_present && return 0
    command -v go >/dev/null || { echo "go not found (expected /usr/local/go/bin/go)"; return 1; }
    local dir work prefix
    dir="$(cd "${BUILDFLEET_TOOLS}" && GOFLAGS=-mod=mod go mod download -json \
        "${TRACE_VIEWER_MODULE}@${TRACE_VIEWER_VERSION}" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [[ -n "${dir}" && -d "${dir}" ]] || { echo "go mod download gave no Dir"; return 1; }
    prefix="${BUILDFLEET_TOOLS}/otel-desktop-viewer-${TRACE_VIEWER_VERSION}"
    work="${prefix}/src.partial"
    rm -rf "${work}" "${prefix}/bin.partial"
    mkdir -p "${prefix}"
    cp -r "${dir}" "${work}"
    chmod -R u+w "${work}"
    (cd "${work}" && CGO_ENABLED=1 GOWORK=off go build -mod=mod -trimpath \
        -ldflags "-X main.version=${TRACE_VIEWER_VERSION#v}" \
        -o "${prefix}/bin.partial/otel-desktop-viewer" .) || return 1
    rm -rf "${TRACE_VIEWER_BIN}"
    mv "${prefix}/bin.partial" "${TRACE_VIEWER_BIN}"
    rm -rf "${work}"
}

# run_bg LOG CMD...: run CMD in the background in its own session (so it can be stopped
# as a whole), output to LOG. Sets BG_PID; its process group id is the same number.
BG_PIDS=()
run_bg() {
    local log="$1"
    shift
    setsid "$@" >"${log}" 2>&1 </dev/null &
    BG_PID=$!
    BG_PIDS+=("${BG_PID}")
}

# wait_bg PID LOG WHAT: wait for a run_bg job; on failure show its log and die naming WHAT.
wait_bg() {
    local pid="$1" log="$2" what="$3" rc=0
    wait "${pid}" || rc=$?
    if [[ "${rc}" != 0 ]]; then
        tail -n 40 "${log}" >&2 || true
        die "${what} (exit ${rc}); full log: ${log}"
    fi
}

# stop_bg: stop background jobs still running (e.g. when setup fails or is interrupted).
stop_bg() {
    local pid
    for pid in "${BG_PIDS[@]}"; do
        # Not yet waited for, so the pid cannot have been reused.
        kill -0 "${pid}" 2>/dev/null && kill -TERM -- "-${pid}" 2>/dev/null
    done
    return 0
}
