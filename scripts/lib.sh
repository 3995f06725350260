# shellcheck shell=bash
# Shared helpers for scripts/setup and scripts/test. Source it; do not run it.

BUILDKIT_VERSION="v0.26.3"
BUILDKIT_MODULE="github.com/moby/buildkit"
export PATH="/usr/local/go/bin:${PATH}"
BUILDFLEET_TOOLS="${BUILDFLEET_TOOLS:-${HOME}/.cache/buildfleet/tools}"
BUILDKIT_BIN="${BUILDFLEET_TOOLS}/buildkit-${BUILDKIT_VERSION}/bin"

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

# Run "$@" in the background, output to LOG, exit status to LOG.rc. Prints the PID.
run_bg() {
    local log="$1"
    shift
    rm -f "${log}.rc"
    ( set +e; "$@" >"${log}" 2>&1; echo $? >"${log}.rc" ) &
    echo $!
}

# wait_bg PID LOG WHAT: wait for a run_bg job, fail naming WHAT and its LOG.
wait_bg() {
    local pid="$1" log="$2" what="$3" rc
    wait "${pid}" || true
    rc="$(cat "${log}.rc" 2>/dev/null || echo 1)"
    if [[ "${rc}" != 0 ]]; then
        tail -n 40 "${log}" >&2 || true
        die "${what} (exit ${rc}); full log: ${log}"
    fi
}
