#!/usr/bin/env bash
# The distinct-name attack (issue 12, finding 2), as a benchmark: the
# gateway's RSS over time while attackers subscribe to new made-up names as
# fast as the node lets them, and (second run) an API client also publishes
# to a new name each time. A production-mode node (JWT secret, API key, no
# --dev), release build, embedded store. Loopback only; each run bounded.
#
# The stream TTL for never-published names is shortened from its 5 min
# default so that the plateau shows within the run; replay_max_streams is
# lowered for the publish run for the same reason. Both are printed.
#
# Knobs: DURATION=150 CONNS=20 USERS=10 PUB_RATE=2000 EMPTY_TTL_MS=30000
#   MAX_STREAMS=200000 GW=path NO_BUILD=1
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-150}
CONNS=${CONNS:-20}
USERS=${USERS:-10}
PUB_RATE=${PUB_RATE:-2000}
EMPTY_TTL_MS=${EMPTY_TTL_MS:-30000}
MAX_STREAMS=${MAX_STREAMS:-200000}
SECRET=bench-names-jwt-secret-0123456789
KEY=bench-names-api-key

if [ -z "${NO_BUILD:-}" ]; then
  cargo build --release -p gateway -p loadtest
fi
GW=${GW:-target/release/gateway}
LT=target/release/loadtest

echo "== machine"
echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "cpus:    $(nproc) ($(lscpu | sed -n 's/^Model name: *//p' | head -1))"
echo "commit:  $(git rev-parse --short HEAD)"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run() { # name, extra env..., then the loadtest flags after --
  local name=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local p; p=$(port)
  echo
  echo "== $name"
  echo "gateway settings: ${envs[*]:-(defaults)}"
  env GATEWAY_ADDR="127.0.0.1:$p" GATEWAY_JWT_SECRET=$SECRET GATEWAY_API_KEYS=$KEY \
    GATEWAY_LOG=warn "${envs[@]}" "$GW" >"target/bench-names-$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 50); do curl -fs "http://127.0.0.1:$p/livez" >/dev/null && break; sleep 0.1; done
  timeout $((DURATION + 60)) "$LT" names --url "http://127.0.0.1:$p" --gateway-pid $pid \
    --jwt-secret $SECRET --api-key $KEY --connections "$CONNS" --users "$USERS" \
    --duration "$DURATION" "$@" || echo "loadtest failed: $?"
  kill -TERM $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
}

run subscribe GATEWAY_STREAM_EMPTY_TTL_MS=$EMPTY_TTL_MS -- --publish-rate 0
run subscribe-publish GATEWAY_STREAM_EMPTY_TTL_MS=$EMPTY_TTL_MS \
  GATEWAY_REPLAY_MAX_STREAMS=$MAX_STREAMS -- --publish-rate "$PUB_RATE"
