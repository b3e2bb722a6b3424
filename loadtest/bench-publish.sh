#!/usr/bin/env bash
# Publishing and fan-out with presence and idempotency keys off, two gateway
# builds alternated in one sitting (issue 14's "unchanged against the
# build before it"). Per round and build:
#   publish  one cluster node on its own redis-server, 50 SDK subscribers
#            over 5 channels, the publish API driven well above what it
#            can take (--rate 20000, 64 in flight, no idempotency keys):
#            accepted publishes/s, API round trip, publish -> receive;
#   fanout   loadtest/bench.sh's fan-out (embedded node, 5,000 WebSocket
#            subscribers, 200 msg/s, 20 s): deliveries/s and p50/p99/p99.9.
# Usage: A=path/to/gateway-A B=path/to/gateway-B [ROUNDS=2] loadtest/bench-publish.sh
# Needs target/release/loadtest (cargo build --release -p loadtest).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${A:?A=gateway binary A}" "${B:?B=gateway binary B}"
ROUNDS=${ROUNDS:-2}; OUT=${OUT:-target/bench-publish}
LT=target/release/loadtest
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "date: $(date -u +%FT%TZ)  cpus: $(nproc) ($(lscpu | sed -n 's/^Model name: *//p' | head -1))"
echo "A: $A"; echo "B: $B"
for round in $(seq "$ROUNDS"); do
  for side in A B; do
    bin=${!side}
    d="$OUT/$side-$round"
    "$LT" run broadcast --nodes 1 --redis --subscribers 50 --channels 5 \
      --rate 20000 --duration 10 --publish-concurrency 64 --no-idempotency-keys \
      --gateway-bin "$bin" --no-progress --out "$d" >"$d.log" 2>&1 || true
    pub=$(grep -m1 '^messages:' "$d/summary.txt" | sed 's/ expected deliveries.*//')
    api=$(grep -m1 'publish API round trip' "$d/summary.txt" | sed 's/.*round trip: //; s/, p90[^,]*//; s/, p99.9.*//')
    lat=$(grep -m1 'latency publish -> receive' "$d/summary.txt" | sed 's/.*receive: //; s/, p90[^,]*//; s/, p99.9.*//')
    echo "round $round $side publish: $pub | API $api | publish->receive $lat"
    NO_BUILD=1 GW="$bin" ONLY=fanout OUT="$OUT/fanout-$side-$round" loadtest/bench.sh >"$OUT/fanout-$side-$round.log" 2>&1 || true
    echo "round $round $side fanout: $(grep -h "^RESULT" "$OUT/fanout-$side-$round.log" || echo failed)"
  done
done
