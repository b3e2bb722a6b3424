#!/usr/bin/env bash
# CPU per delivery split into user space and kernel, from `perf` samples
# (issue 16 item 3): finer than `loadtest fanout`'s own figure, which comes
# from /proc's 10 ms ticks. Servers (gateway builds and `loadtest
# reference`) are alternated run by run within each round.
#
#   flock -x /tmp/heavy.lock loadtest/bench-cpu-split.sh
#   SERVERS="ref=reference A=/path/old-gateway B=target/release/gateway" \
#     ROUNDS=3 TRANSPORTS="sse ws" NO_BUILD=1 loadtest/bench-cpu-split.sh
#
# Per run: SUBS (5000) subscribers of one channel at RATE (20) msg/s, so
# every delivery is its own write; the server pinned to CPU 0 with one
# worker thread, the load generator on CPU 1; after WARMUP (11) s, `perf
# record` samples the server's CPU clock at FREQ (4000) Hz for WINDOW (10)
# s. µs per delivery = samples / FREQ / deliveries in the window * 1e6,
# split by where the sample fell (the kernel, or the server's own code and
# libraries). Needs `perf` (Debian: linux-perf) and root or
# kernel.perf_event_paranoid <= 1. Prints one line per run and the mean of
# each server at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVERS=${SERVERS:-"ref=reference gateway=target/release/gateway"}
ROUNDS=${ROUNDS:-3}
TRANSPORTS=${TRANSPORTS:-"sse ws"}
SUBS=${SUBS:-5000}
RATE=${RATE:-20}
WARMUP=${WARMUP:-11}
WINDOW=${WINDOW:-10}
FREQ=${FREQ:-4000}
CONNECT_RATE=${CONNECT_RATE:-5000}   # as bench.sh: the same runs as bench-reference.sh
OUT=${OUT:-target/bench-cpu-split}
LT=target/release/loadtest

command -v perf >/dev/null || { echo "perf is missing (Debian: apt-get install linux-perf)" >&2; exit 2; }
if [ -z "${NO_BUILD:-}" ]; then
  cargo build --release -p gateway -p loadtest
fi
mkdir -p "$OUT"
: >"$OUT/results.txt"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "== bench-cpu-split: $(date -u +%Y-%m-%dT%H:%M:%SZ), rounds $ROUNDS, transports $TRANSPORTS, $SUBS subscribers x $RATE msg/s, perf $FREQ Hz for $WINDOW s"
echo "servers: $SERVERS"

one() { # label server transport round
  local label=$1 server=$2 t=$3 r=$4 dir pid url ltp
  dir="$OUT/$label-$t-$r"
  mkdir -p "$dir"
  if [ "$server" = reference ]; then
    GATEWAY_WORKER_THREADS=1 taskset -c 0 "$LT" reference --addr 127.0.0.1:0 >"$dir/server.out" 2>"$dir/server.err" &
  else
    GATEWAY_WORKER_THREADS=1 GATEWAY_ADMISSION_RATE=20000 GATEWAY_LOG=warn \
      taskset -c 0 "$server" --dev --addr 127.0.0.1:0 >"$dir/server.out" 2>"$dir/server.err" &
  fi
  pid=$!
  url=
  for _ in $(seq 100); do
    url=$(sed -n 's/^listening on \(http:\/\/.*\)$/\1/p' "$dir/server.out" | head -1)
    [ -n "$url" ] && break
    sleep 0.1
  done
  if [ -z "$url" ]; then
    echo "$label $t round $r: the server did not start (see $dir)" | tee -a "$OUT/results.txt"
    kill "$pid" 2>/dev/null || true
    return
  fi
  timeout --signal=INT --kill-after=10 120 taskset -c 1 "$LT" fanout --transport "$t" \
    --subscribers "$SUBS" --rate "$RATE" --duration $((WARMUP + WINDOW + 3)) \
    --connect-rate "$CONNECT_RATE" --url "$url" --gateway-pid "$pid" >"$dir/fanout.txt" 2>&1 &
  ltp=$!
  sleep "$WARMUP"
  perf record -F "$FREQ" -p "$pid" -o "$dir/perf.data" -- sleep "$WINDOW" >/dev/null 2>&1 || true
  wait "$ltp" || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  perf report -i "$dir/perf.data" --sort dso --stdio -F sample,dso 2>/dev/null |
    grep -v '^#' | grep -v '^$' >"$dir/dso.txt" || true
  local deliveries kernel all checked
  deliveries=$((SUBS * RATE * WINDOW))
  kernel=$(awk '/kernel.kallsyms/ {s += $1} END {print s + 0}' "$dir/dso.txt")
  all=$(awk '{s += $1} END {print s + 0}' "$dir/dso.txt")
  checked=$(grep -m1 -o 'lost [0-9]*, duplicates [0-9]*' "$dir/fanout.txt" || echo "no RESULT: see $dir/fanout.txt")
  awk -v l="$label" -v t="$t" -v r="$r" -v a="$all" -v k="$kernel" -v f="$FREQ" -v d="$deliveries" -v c="$checked" \
    'BEGIN { s = 1e6 / f / d; printf "%s %s round %s: all %.2f = user %.2f + kernel %.2f µs/delivery (%s)\n", l, t, r, a * s, (a - k) * s, k * s, c }' |
    tee -a "$OUT/results.txt"
}

for r in $(seq 1 "$ROUNDS"); do
  for t in $TRANSPORTS; do
    for s in $SERVERS; do
      one "${s%%=*}" "${s#*=}" "$t" "$r"
    done
  done
done

echo
echo "== mean by server (µs per delivery: all = user + kernel)"
for t in $TRANSPORTS; do
  for s in $SERVERS; do
    grep "^${s%%=*} $t round" "$OUT/results.txt" |
      sed -E 's/.*all ([0-9.]+) = user ([0-9.]+) \+ kernel ([0-9.]+).*/\1 \2 \3/' |
      awk -v l="${s%%=*}" -v t="$t" '{a += $1; u += $2; k += $3; n++} END { if (n) printf "%s %s: %.2f = %.2f + %.2f (%d runs)\n", t, l, a / n, u / n, k / n, n }'
  done
done
