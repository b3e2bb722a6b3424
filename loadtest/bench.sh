#!/usr/bin/env bash
# The standard benchmark set (figures in BENCHMARKS.md):
#   1. idle WebSocket connections: gateway memory per connection
#   2. idle SSE connections: the same
#   3. fan-out: one channel, WebSocket subscribers, fixed publish rate
#   4. many subscriptions (not in the default set: ONLY=manysubs): WebSocket
#      subscribers each holding MS_SUBSCRIPTIONS subscriptions, traffic on
#      MS_CHANNELS of them; CPU per delivery and latency
#   5. fan-out to SSE subscribers (not in the default set: ONLY=fanout-sse)
# Each run gets a fresh gateway (--dev, embedded node) pinned to core $GW_CPU;
# the load generator is pinned to core $LT_CPU. Loopback traffic only. Every
# step is bounded in time; the gateway is stopped between runs.
#
# Knobs (environment): CONNS=19000 SUBS=5000 RATE=200 DURATION=20
#   GW_CPU=0 LT_CPU=1 OUT=target/bench NO_BUILD=1 (use existing binaries)
#   GW=path (another gateway binary, e.g. an older build, for an A/B)
#   CONNECT_RATE=5000 (new connections/s offered by the load generator)
#   ONLY="idle-ws idle-sse fanout fanout-sse manysubs" (a subset; the
#   default is the first three)  GATEWAY_WORKER_THREADS=N
#   SERVER=reference (measure `loadtest reference`, the thinnest fan-out
#   server, instead of the gateway: the yardstick of issue 16)
#   NOISE=30 (a noisy neighbour: `loadtest noise` takes that percentage of
#   the server's core, pinned beside it, during every run)
#   MS_SUBS=1000 MS_SUBSCRIPTIONS=100 MS_CHANNELS=4 MS_RATE=200
#   MS_DURATION=10 (the many-subscriptions run)
#   GATEWAY_ADMISSION_RATE=20000 (the gateway's admission limit, default
#   2000/s, is raised above CONNECT_RATE so that it does not shape the runs)
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${CONNS:-19000}
SUBS=${SUBS:-5000}
RATE=${RATE:-200}
DURATION=${DURATION:-20}
GW_CPU=${GW_CPU:-0}
LT_CPU=${LT_CPU:-1}
OUT=${OUT:-target/bench}
RUN_LIMIT=${RUN_LIMIT:-300}   # seconds, per loadtest run
CONNECT_RATE=${CONNECT_RATE:-5000}
MS_SUBS=${MS_SUBS:-1000}
MS_SUBSCRIPTIONS=${MS_SUBSCRIPTIONS:-100}
MS_CHANNELS=${MS_CHANNELS:-4}
MS_RATE=${MS_RATE:-200}
MS_DURATION=${MS_DURATION:-10}
export GATEWAY_ADMISSION_RATE=${GATEWAY_ADMISSION_RATE:-20000}
mkdir -p "$OUT"

if [ -z "${NO_BUILD:-}" ]; then
  cargo build --release -p gateway -p loadtest
fi
GW=${GW:-target/release/gateway}   # GW=path/to/other/gateway for an A/B
LT=${LT:-target/release/loadtest}
SERVER=${SERVER:-gateway}
case "$SERVER" in gateway | reference) ;; *) echo "SERVER is gateway or reference" >&2; exit 2 ;; esac

# The gateway holds one descriptor per connection: raise the soft limit to
# the hard one (the hard limit itself cannot be raised here).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "== machine"
echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "cpus:    $(nproc) ($(lscpu | sed -n 's/^Model name: *//p' | head -1))"
echo "memory:  $(free -g | awk '/^Mem:/ {print $2}') GiB"
echo "kernel:  $(uname -r)"
echo "rustc:   $(rustc --version)"
if [ -n "${BENCH_COMMIT:-}" ]; then
  echo "commit:  $BENCH_COMMIT"
elif git rev-parse --short HEAD >/dev/null 2>&1; then
  echo "commit:  $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- gateway || echo ' (gateway/ has uncommitted changes)')"
fi
echo "nofile:  soft $(ulimit -n), hard $(ulimit -Hn)"
echo "pinning: gateway on CPU $GW_CPU, loadtest on CPU $LT_CPU"
if [ "$SERVER" = reference ]; then
  echo "server:  loadtest reference (the thinnest fan-out server), threads ${GATEWAY_WORKER_THREADS:-one per CPU}"
else
  echo "gateway: --dev, GATEWAY_ADMISSION_RATE=$GATEWAY_ADMISSION_RATE, otherwise defaults"
fi
[ -n "${NOISE:-}" ] && echo "noise:   loadtest noise --percent $NOISE pinned to CPU $GW_CPU during every run"

GW_PID=""
GW_URL=""
NOISE_PID=""

start_gateway() {
  local name=$1
  : >"$OUT/$name.gateway.out"
  # taskset and env exec, so $! is the gateway's own pid.
  # GATEWAY_WORKER_THREADS passes through when set (default: one per core;
  # measured better than 1 even when pinned to one core).
  if [ "$SERVER" = reference ]; then
    taskset -c "$GW_CPU" "$LT" reference --addr 127.0.0.1:0 \
      >"$OUT/$name.gateway.out" 2>"$OUT/$name.gateway.err" &
  else
    taskset -c "$GW_CPU" env GATEWAY_LOG=warn "$GW" --dev --addr 127.0.0.1:0 \
      >"$OUT/$name.gateway.out" 2>"$OUT/$name.gateway.err" &
  fi
  GW_PID=$!
  for _ in $(seq 1 100); do
    GW_URL=$(sed -n 's/^listening on \(http:\/\/.*\)$/\1/p' "$OUT/$name.gateway.out" | head -1)
    [ -n "$GW_URL" ] && break
    kill -0 "$GW_PID" 2>/dev/null || { echo "gateway exited:"; cat "$OUT/$name.gateway.err"; exit 1; }
    sleep 0.1
  done
  [ -n "$GW_URL" ] || { echo "gateway did not start within 10 s"; exit 1; }
  # Let it finish starting before the baseline memory reading.
  sleep 0.5
  if [ -n "${NOISE:-}" ]; then
    taskset -c "$GW_CPU" "$LT" noise --percent "$NOISE" &
    NOISE_PID=$!
  fi
}

stop_gateway() {
  if [ -n "$NOISE_PID" ]; then
    kill "$NOISE_PID" 2>/dev/null || true
    wait "$NOISE_PID" 2>/dev/null || true
    NOISE_PID=""
  fi
  [ -n "$GW_PID" ] || return 0
  kill -TERM "$GW_PID" 2>/dev/null || true
  for _ in $(seq 1 150); do
    kill -0 "$GW_PID" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$GW_PID" 2>/dev/null; then
    echo "(gateway did not stop within 15 s of SIGTERM; killing it)"
    kill -KILL "$GW_PID" 2>/dev/null || true
  fi
  wait "$GW_PID" 2>/dev/null || true
  GW_PID=""
}
trap stop_gateway EXIT

# run NAME -- loadtest arguments (the gateway URL and pid are appended)
run() {
  local name=$1
  shift
  echo
  echo "== $name"
  start_gateway "$name"
  echo "\$ taskset -c $LT_CPU loadtest $* --url $GW_URL --gateway-pid $GW_PID"
  local rc=0
  timeout --signal=INT --kill-after=10 "$RUN_LIMIT" \
    taskset -c "$LT_CPU" "$LT" "$@" --url "$GW_URL" --gateway-pid "$GW_PID" 2>&1 | tee "$OUT/$name.txt" || rc=$?
  [ "$rc" -eq 0 ] || echo "(loadtest exited with status $rc)"
  if grep -qiE "panic|error" "$OUT/$name.gateway.err"; then
    echo "-- gateway stderr (errors):"
    grep -iE "panic|error" "$OUT/$name.gateway.err" | head -20
  fi
  stop_gateway
}

wanted() {
  if [ -z "${ONLY:-}" ]; then [ "$1" != manysubs ]; else [[ " $ONLY " == *" $1 "* ]]; fi
}
wanted idle-ws && run idle-ws idle --transport ws --connections "$CONNS" --rate "$CONNECT_RATE"
wanted idle-sse && run idle-sse idle --transport sse --connections "$CONNS" --rate "$CONNECT_RATE"
wanted fanout && run fanout fanout --subscribers "$SUBS" --rate "$RATE" --duration "$DURATION" --connect-rate "$CONNECT_RATE"
wanted fanout-sse && run fanout-sse fanout --transport sse --subscribers "$SUBS" --rate "$RATE" --duration "$DURATION" --connect-rate "$CONNECT_RATE"
wanted manysubs && run manysubs fanout --subscribers "$MS_SUBS" --subscriptions "$MS_SUBSCRIPTIONS" \
  --channels "$MS_CHANNELS" --rate "$MS_RATE" --duration "$MS_DURATION" --connect-rate "$CONNECT_RATE"

echo
echo "== summary"
for n in idle-ws idle-sse fanout fanout-sse manysubs; do wanted $n && grep -h '^RESULT' "$OUT/$n.txt"; done || true
