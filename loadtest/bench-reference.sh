#!/usr/bin/env bash
# The gateway against the reference server (issue 16): the same fan-out
# runs (loadtest/bench.sh) on `loadtest reference`, the thinnest fan-out
# server, and on one or more gateway builds, alternated round by round in
# one sitting, so that the machine's drift falls on every server alike.
#
#   flock -x /tmp/heavy.lock loadtest/bench-reference.sh
#   GWS="A=/path/to/old/gateway B=target/release/gateway" ROUNDS=3 \
#     RATES="20 200" TRANSPORTS="ws sse" NOISE=30 loadtest/bench-reference.sh
#
# Per run: SUBS subscribers (5000) on one channel, RATE messages/s for
# DURATION s (20), server pinned to CPU 0 with GATEWAY_WORKER_THREADS
# (default 1: the issue's setting; the reference follows it too), load
# generator on CPU 1. At 20 msg/s every delivery is its own write (CPU
# per delivery); at 200 msg/s the server is near a full core (the tail).
# NOISE=<percent>: a noisy neighbour on the server's core (loadtest noise).
# Prints one line per run and, at the end, every figure by server.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-2}
RATES=${RATES:-"20 200"}
TRANSPORTS=${TRANSPORTS:-"ws sse"}
GWS=${GWS:-"gateway=target/release/gateway"}
OUT=${OUT:-target/bench-reference}
export GATEWAY_WORKER_THREADS=${GATEWAY_WORKER_THREADS:-1}
export SUBS=${SUBS:-5000} DURATION=${DURATION:-20}

if [ -z "${NO_BUILD:-}" ]; then
  cargo build --release -p gateway -p loadtest
fi
mkdir -p "$OUT"
: >"$OUT/results.txt"
echo "== bench-reference: $(date -u +%Y-%m-%dT%H:%M:%SZ), rounds $ROUNDS, rates $RATES, transports $TRANSPORTS, subscribers $SUBS, $DURATION s, worker threads $GATEWAY_WORKER_THREADS, noise ${NOISE:-none}"
echo "servers: reference $GWS"

one() { # label server gw rate transport round
  local label=$1 server=$2 gw=$3 rate=$4 t=$5 r=$6 only line
  only=fanout
  [ "$t" = sse ] && only=fanout-sse
  local dir="$OUT/$label-$t-$rate-$r"
  mkdir -p "$dir"
  NO_BUILD=1 SERVER=$server GW=$gw RATE=$rate ONLY=$only OUT="$dir" \
    loadtest/bench.sh >"$dir/bench.txt" 2>&1 || true
  line=$(grep -m1 '^RESULT fanout' "$dir/bench.txt" || echo "RESULT fanout $t: (failed: see $dir/bench.txt)")
  echo "$label $rate/s round $r: $line" | tee -a "$OUT/results.txt"
}

for r in $(seq 1 "$ROUNDS"); do
  for rate in $RATES; do
    for t in $TRANSPORTS; do
      one reference reference target/release/gateway "$rate" "$t" "$r"
      for g in $GWS; do
        one "${g%%=*}" gateway "${g#*=}" "$rate" "$t" "$r"
      done
    done
  done
done

echo
echo "== summary (CPU µs per delivery; latency p99 / p99.9 ms)"
for rate in $RATES; do
  for t in $TRANSPORTS; do
    for label in reference $(for g in $GWS; do echo "${g%%=*}"; done); do
      grep "^$label $rate/s " "$OUT/results.txt" | grep "fanout $t:" |
        sed -E 's/.*lost ([0-9]+), duplicates ([0-9]+), latency p50 ([0-9.]+) ms p99 ([0-9.]+) ms p99.9 ([0-9.]+) ms.*CPU ([0-9.]+) µs\/delivery( \(user [0-9.]+ \+ kernel [0-9.]+\))?.*/\6 µs\7, p99 \4, p99.9 \5 (lost \1, dup \2)/' |
        paste -sd';' | sed "s/^/$t $rate\/s $label: /"
    done
  done
done
