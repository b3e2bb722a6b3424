#!/usr/bin/env bash
# What a Redis Cluster backbone costs a publish against one Redis (figures
# in BENCHMARKS.md, "Redis Cluster against one Redis"). Starts, on loopback,
# one redis-server and a Redis Cluster of three masters and three replicas
# (redis-cli --cluster create); then, alternating, a gateway node on each
# (`redis_url`, `redis_cluster_urls`) and `loadtest run broadcast`, which
# publishes RATE messages/s over CHANNELS channels (spread over the
# cluster's slots) for DURATION s to SUBS subscribers and prints the
# publish API round trip and the delivery figures.
# Knobs: ROUNDS=2 RATE=500 DURATION=10 SUBS=60 CHANNELS=30 CONC=8,
# GW=target/release/gateway LT=target/release/loadtest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}; RATE=${RATE:-500}; DURATION=${DURATION:-10}
SUBS=${SUBS:-60}; CHANNELS=${CHANNELS:-30}; CONC=${CONC:-8}
GW=${GW:-target/release/gateway}; LT=${LT:-target/release/loadtest}
[ -x "$GW" ] && [ -x "$LT" ] || cargo build --release -p gateway -p loadtest
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
DIR=$(mktemp -d); PIDS=(); GPID=""
trap 'kill $GPID "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"' EXIT
S=$(port)
redis-server --port "$S" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" >"$DIR/single.log" 2>&1 &
PIDS+=($!)
SEEDS=(); URLS=""
for i in 0 1 2 3 4 5; do
  P=$(port); B=$(port); mkdir -p "$DIR/c$i"
  # The cluster bus on a port of its own (default: port + 10000).
  redis-server --port "$P" --cluster-port "$B" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$DIR/c$i" --cluster-enabled yes --cluster-config-file nodes.conf \
    --cluster-require-full-coverage no >"$DIR/c$i.log" 2>&1 &
  PIDS+=($!); SEEDS+=("127.0.0.1:$P"); URLS="$URLS${URLS:+,}redis://127.0.0.1:$P"
done
for s in "${SEEDS[@]}"; do
  for _ in $(seq 50); do redis-cli -p "${s#*:}" PING >/dev/null 2>&1 && break; sleep 0.1; done
done
redis-cli --cluster create "${SEEDS[@]}" --cluster-replicas 1 --cluster-yes >"$DIR/create.log" 2>&1
for s in "${SEEDS[@]}"; do
  for _ in $(seq 100); do
    redis-cli -p "${s#*:}" CLUSTER INFO | grep -q 'cluster_state:ok' && break; sleep 0.1
  done
done
echo "redis-server $(redis-server --version | awk '{print $3}'): one server, and a cluster of 3 masters + 3 replicas, on loopback; $(nproc) cores"
echo "broadcast: $RATE msg/s over $CHANNELS channels for $DURATION s, $SUBS subscribers, $CONC publishes in flight"
for round in $(seq "$ROUNDS"); do
  for mode in single cluster; do
    GP=$(port)
    if [ "$mode" = single ]; then
      export GATEWAY_REDIS_URL="redis://127.0.0.1:$S"; unset GATEWAY_REDIS_CLUSTER_URLS
    else
      export GATEWAY_REDIS_CLUSTER_URLS="$URLS"; unset GATEWAY_REDIS_URL
    fi
    "$GW" --dev --addr "127.0.0.1:$GP" >"$DIR/gw.log" 2>&1 &
    GPID=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$GP/livez" >/dev/null 2>&1 && break; sleep 0.1; done
    out=$("$LT" run broadcast --url "http://127.0.0.1:$GP" --subscribers "$SUBS" --channels "$CHANNELS" \
      --rate "$RATE" --duration "$DURATION" --publish-concurrency "$CONC" 2>&1)
    echo "round $round, $mode:"
    echo "$out" | grep -E 'publish API round trip|published|lost|duplicat|latency' | sed 's/^/  /'
    kill "$GPID"; wait "$GPID" 2>/dev/null || true; GPID=""
  done
done
