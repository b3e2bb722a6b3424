#!/usr/bin/env bash
# Cluster fan-out cost per node (issue 16 item 6): two gateway builds
# alternated in one sitting, on a Redis backbone and on NATS. Per round,
# backbone, transport and build: `loadtest run broadcast` starts a
# redis-server (and a nats-server), 3 gateway nodes, SUBS subscribers
# spread over the nodes and CHANNELS channels (5 channels, 3 nodes: every
# channel has subscribers on every node, so every node receives every
# message from the backbone), publishes RATE msg/s through the nodes in
# turn for DURATION s (no idempotency keys), and prints each node's CPU
# time (/proc/<pid>/stat, from the start of publishing to the end of
# delivery) per published message, deliveries, lost and duplicates.
# The data is an object with ITEMS structured items (about 70 bytes each)
# besides the timestamp and PAD bytes of padding.
# Usage: A=path/to/gateway-A B=path/to/gateway-B [ROUNDS=2]
#        [BACKBONES="redis nats"] [TRANSPORTS="ws ws-msgpack"]
#        loadtest/bench-cluster-fanout.sh
# Run it under `flock -x /tmp/heavy.lock`. Needs target/release/loadtest
# (cargo build --release -p loadtest), redis-server and nats-server.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${A:?A=gateway binary A}" "${B:?B=gateway binary B}"
ROUNDS=${ROUNDS:-2}; BACKBONES=${BACKBONES:-redis nats}; TRANSPORTS=${TRANSPORTS:-ws ws-msgpack}
RATE=${RATE:-500}; DURATION=${DURATION:-15}; SUBS=${SUBS:-30}; CHANNELS=${CHANNELS:-5}
ITEMS=${ITEMS:-20}; PAD=${PAD:-16}
OUT=${OUT:-target/bench-cluster-fanout}
LT=target/release/loadtest
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "date: $(date -u +%FT%TZ)  cpus: $(nproc) ($(lscpu | sed -n 's/^Model name: *//p' | head -1))"
echo "A: $A"; echo "B: $B"
echo "3 nodes, $SUBS subscribers over $CHANNELS channels, $RATE msg/s for $DURATION s, data: $ITEMS items + $PAD B padding"
for round in $(seq "$ROUNDS"); do
  for backbone in $BACKBONES; do
    for transport in $TRANSPORTS; do
      for side in A B; do
        bin=${!side}
        d="$OUT/$round-$backbone-$transport-$side"
        flag=--redis; [ "$backbone" = nats ] && flag=--nats
        "$LT" run broadcast --nodes 3 "$flag" --transport "$transport" \
          --subscribers "$SUBS" --channels "$CHANNELS" --rate "$RATE" --duration "$DURATION" \
          --payload-items "$ITEMS" --payload-bytes "$PAD" --no-idempotency-keys \
          --gateway-bin "$bin" --no-progress --out "$d" >"$d.log" 2>&1 || true
        s="$d/summary.txt"
        if [ ! -f "$s" ]; then echo "round $round $backbone $transport $side: failed (see $d.log)"; continue; fi
        per=$(sed -n 's/.*CPU while publishing [0-9.]* s (\([0-9.]*\) us per published message).*/\1/p' "$s" | paste -sd/)
        sum=$(sed -n 's/.*CPU while publishing [0-9.]* s (\([0-9.]*\) us per published message).*/\1/p' "$s" \
          | awk '{t+=$1} END {printf "%.1f", t}')
        msgs=$(grep -m1 '^messages:' "$s" | sed 's/ (.*expected deliveries; / | /; s/, duplicates dropped.*//')
        echo "round $round $backbone $transport $side: CPU us/msg per node $per (sum $sum) | $msgs"
      done
    done
  done
done
