#!/usr/bin/env bash
# The cost of presence (issue 14): a channel of a presence-enabled namespace
# with MEMBERS WebSocket members held on one cluster node (Redis), while
# CHURNERS connections subscribe to it and leave it CHURN_RATE times a
# second each (a join and a leave per cycle). Prints, over WINDOW seconds,
# the gateway's and Redis's CPU, Redis commands per second, and how long
# presence_stats takes. Run once with presence on and once off (the same
# channel in a namespace without presence) to see what presence adds.
# Dev mode (the members connect anonymously; the churners with tokens).
# Loopback only; bounded.
#
# Knobs: MEMBERS=5000 CHURNERS=5 CHURN_RATE=10 WINDOW=30 JOIN_LEAVE=false
set -euo pipefail
cd "$(dirname "$0")/.."
MEMBERS=${MEMBERS:-5000}; CHURNERS=${CHURNERS:-5}; CHURN_RATE=${CHURN_RATE:-10}
WINDOW=${WINDOW:-30}; JOIN_LEAVE=${JOIN_LEAVE:-false}
[ -n "${NO_BUILD:-}" ] || cargo build --release -p gateway -p loadtest
GW=${GW:-target/release/gateway}; LT=target/release/loadtest
SECRET=bench-presence-jwt-secret-0123456789
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "cpus:    $(nproc) ($(lscpu | sed -n 's/^Model name: *//p' | head -1))"
echo "commit:  $(git rev-parse --short HEAD)"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
DIR=$(mktemp -d)
RP=$(port)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
RPID=$!
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"' EXIT
sleep 0.5

run() { # presence on|off
  local presence=$1 p; p=$(port)
  printf '[[namespace]]\nname = "room"\npresence = %s\njoin_leave = %s\n' \
    "$([ "$presence" = on ] && echo true || echo false)" "$JOIN_LEAVE" >"$DIR/gw.toml"
  GATEWAY_CONFIG="$DIR/gw.toml" GATEWAY_REDIS_URL="redis://127.0.0.1:$RP" GATEWAY_ADDR="127.0.0.1:$p" \
    GATEWAY_JWT_SECRET=$SECRET GATEWAY_API_KEYS=k GATEWAY_LOG=warn GATEWAY_ADMISSION_RATE=20000 \
    GATEWAY_SUBSCRIBE_RATE=1000 GATEWAY_USER_SUBSCRIBE_RATE=10000 "$GW" --dev >"$DIR/gw-$presence.log" 2>&1 &
  local gpid=$!
  for _ in $(seq 50); do curl -fs "http://127.0.0.1:$p/livez" >/dev/null && break; sleep 0.1; done
  # The members: held by a worker until its stdin closes.
  (sleep $((WINDOW + 40)) | "$LT" worker --transport ws --url "http://127.0.0.1:$p" --channel room:big \
    --connections "$MEMBERS" --rate 2000 --concurrency 128 --hold-max $((WINDOW + 60)) >"$DIR/members.log" 2>&1) &
  for _ in $(seq 120); do grep -q READY "$DIR/members.log" 2>/dev/null && break; sleep 0.5; done
  sleep 2
  local g0 r0 c0; g0=$(cpu $gpid); r0=$(cpu $RPID); c0=$(redis-cli -p "$RP" INFO stats | tr -d '\r' | sed -n 's/^total_commands_processed://p')
  "$LT" names --url "http://127.0.0.1:$p" --gateway-pid $gpid --jwt-secret $SECRET --connections "$CHURNERS" \
    --users "$CHURNERS" --duration "$WINDOW" --sample "$WINDOW" --churn-channel room:big --churn-rate "$CHURN_RATE" \
    | grep result
  local g1 r1 c1; g1=$(cpu $gpid); r1=$(cpu $RPID); c1=$(redis-cli -p "$RP" INFO stats | tr -d '\r' | sed -n 's/^total_commands_processed://p')
  local t0; t0=$(date +%s%N)
  local stats; stats=$(curl -s -X POST -H 'authorization: Bearer k' "http://127.0.0.1:$p/api/presence_stats" -d '{"channel":"room:big"}')
  local t1; t1=$(date +%s%N)
  echo "presence $presence: gateway CPU $(awk "BEGIN{printf \"%.1f\", ($g1-$g0)/$WINDOW}") % of a core, redis CPU $(awk "BEGIN{printf \"%.1f\", ($r1-$r0)/$WINDOW}") %, redis $(( (c1 - c0) / WINDOW )) commands/s; presence_stats in $(( (t1 - t0) / 1000000 )) ms: $stats"
  kill $gpid 2>/dev/null; wait $gpid 2>/dev/null || true
  pkill -f "worker --transport ws --url http://127.0.0.1:$p" 2>/dev/null || true
  sleep 1
}
echo "members $MEMBERS, churn: $CHURNERS connections x $CHURN_RATE cycles/s (a join and a leave each), window ${WINDOW}s, join_leave=$JOIN_LEAVE"
run off
run on
