#!/usr/bin/env bash
# What `redis_min_replica_acks` costs a publish (figures in BENCHMARKS.md,
# "Replay store: waiting for replicas"). Starts a throwaway Redis master with
# one replica on loopback and, for each setting in ACKS, a gateway node on
# the master; then `loadtest run broadcast` publishes RATE messages/s for
# DURATION s to SUBS subscribers and prints the publish API round trip.
# Knobs: ACKS="0 1" ROUNDS=2 RATE=500 DURATION=10 SUBS=50 CONC=8,
# GW=target/release/gateway LT=target/release/loadtest.
set -euo pipefail
cd "$(dirname "$0")/.."
ACKS=${ACKS:-"0 1"}; ROUNDS=${ROUNDS:-2}; RATE=${RATE:-500}; DURATION=${DURATION:-10}
SUBS=${SUBS:-50}; CONC=${CONC:-8}
GW=${GW:-target/release/gateway}; LT=${LT:-target/release/loadtest}
[ -x "$GW" ] && [ -x "$LT" ] || cargo build --release -p gateway -p loadtest
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
M=$(port); R=$(port); DIR=$(mktemp -d)
redis-server --port "$M" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" >"$DIR/master.log" 2>&1 &
MPID=$!
redis-server --port "$R" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" --replicaof 127.0.0.1 "$M" >"$DIR/replica.log" 2>&1 &
RPID=$!
GPID=""
trap 'kill $GPID $MPID $RPID 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 50); do
  redis-cli -p "$M" INFO replication 2>/dev/null | grep -q 'connected_slaves:1' && break; sleep 0.2
done
echo "redis-server $(redis-server --version | awk '{print $3}') master + 1 replica on loopback; $(nproc) cores"
echo "broadcast: $RATE msg/s for $DURATION s, $SUBS subscribers, $CONC publishes in flight"
for round in $(seq "$ROUNDS"); do
  for acks in $ACKS; do
    GP=$(port)
    GATEWAY_REDIS_URL="redis://127.0.0.1:$M" GATEWAY_REDIS_MIN_REPLICA_ACKS="$acks" \
      "$GW" --dev --addr "127.0.0.1:$GP" >"$DIR/gw.log" 2>&1 &
    GPID=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$GP/livez" >/dev/null 2>&1 && break; sleep 0.1; done
    out=$("$LT" run broadcast --url "http://127.0.0.1:$GP" --subscribers "$SUBS" --channels 1 \
      --rate "$RATE" --duration "$DURATION" --publish-concurrency "$CONC" 2>&1)
    echo "round $round, redis_min_replica_acks=$acks:"
    echo "$out" | grep -E 'publish API round trip|published|lost|duplicat' | sed 's/^/  /'
    kill "$GPID"; wait "$GPID" 2>/dev/null || true; GPID=""
  done
done
