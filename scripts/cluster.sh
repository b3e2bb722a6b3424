#!/usr/bin/env bash
# A local cluster on loopback: redis-server, nats-server, N gateway nodes and
# HAProxy (TCP mode) in front of them. For demos and for the cluster tests.
#
#   scripts/cluster.sh up   [--backbone redis|nats] [--nodes 3] [--dir .cluster] [--release]
#   scripts/cluster.sh down [--dir .cluster]
#
# `up` prints the addresses and writes them to DIR/env (shell syntax):
# LB_URL, NODE_URLS (space-separated), REDIS_URL, NATS_URL, and the pid files
# DIR/*.pid. Extra gateway settings pass through the environment (GATEWAY_*).
set -euo pipefail
cd "$(dirname "$0")/.."

cmd="${1:-}"; shift || true
backbone=redis; nodes=3; dir=.cluster; profile=debug
while (($#)); do
  case "$1" in
    --backbone) backbone="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --release) profile=release; shift ;;
    *) echo "cluster.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_for() { # url, seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "cluster.sh: $1 did not come up" >&2
  return 1
}

down() {
  [ -d "$dir" ] || return 0
  for f in "$dir"/*.pid; do
    [ -e "$f" ] || continue
    kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 0.3
  for f in "$dir"/*.pid; do
    [ -e "$f" ] || continue
    kill -9 "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
}

up() {
  for bin in redis-server nats-server haproxy python3 curl; do
    command -v "$bin" >/dev/null || { echo "cluster.sh: $bin is missing (scripts/test.sh installs it)" >&2; exit 1; }
  done
  local gw="target/$profile/gateway"
  if [ ! -x "$gw" ]; then
    if [ "$profile" = release ]; then cargo build --release -p gateway; else cargo build -p gateway; fi
  fi
  mkdir -p "$dir"
  down
  local redis_port nats_port lb_port
  redis_port=$(free_port); nats_port=$(free_port); lb_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no --logfile "$dir/redis.log" &
  echo $! > "$dir/redis.pid"
  nats-server -a 127.0.0.1 -p "$nats_port" > "$dir/nats.log" 2>&1 &
  echo $! > "$dir/nats.pid"
  for ((i = 0; i < 50; i++)); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

  export GATEWAY_REDIS_URL="redis://127.0.0.1:$redis_port"
  if [ "$backbone" = nats ]; then export GATEWAY_NATS_URL="nats://127.0.0.1:$nats_port"; else unset GATEWAY_NATS_URL; fi
  local node_urls="" servers=""
  for ((n = 1; n <= nodes; n++)); do
    local port; port=$(free_port)
    GATEWAY_NODE_ID="node$n" "$gw" --addr "127.0.0.1:$port" ${GATEWAY_DEV_FLAG:---dev} > "$dir/node$n.log" 2>&1 &
    echo $! > "$dir/node$n.pid"
    node_urls="$node_urls http://127.0.0.1:$port"
    servers="$servers
    server node$n 127.0.0.1:$port check inter 300 fall 2 rise 2"
    echo "$port" > "$dir/node$n.port"
  done
  for u in $node_urls; do wait_for "$u/livez" 15; done

  cat > "$dir/haproxy.cfg" <<CFG
global
    maxconn 9000
defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    option redispatch
    retries 3
frontend gateway
    bind 127.0.0.1:$lb_port
    default_backend nodes
backend nodes
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200$servers
CFG
  haproxy -f "$dir/haproxy.cfg" -db > "$dir/haproxy.log" 2>&1 &
  echo $! > "$dir/haproxy.pid"
  wait_for "http://127.0.0.1:$lb_port/livez" 10

  cat > "$dir/env" <<ENV
LB_URL=http://127.0.0.1:$lb_port
NODE_URLS="${node_urls# }"
REDIS_URL=redis://127.0.0.1:$redis_port
NATS_URL=nats://127.0.0.1:$nats_port
BACKBONE=$backbone
ENV
  echo "cluster up (backbone: $backbone, $nodes nodes, logs in $dir/)"
  cat "$dir/env"
}

case "$cmd" in
  up) up ;;
  down) down; echo "cluster down" ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
