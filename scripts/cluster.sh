#!/usr/bin/env bash
# A local cluster on loopback: redis-server, nats-server, N gateway nodes and
# HAProxy (TCP mode) in front of them. For demos and for the cluster tests.
#
#   scripts/cluster.sh up   [--backbone redis|nats|redis-cluster] [--nodes 3] [--dir .cluster] [--release]
#   scripts/cluster.sh down [--dir .cluster]
#
# --backbone redis-cluster: a Redis Cluster instead of the one redis-server,
# three masters and three replicas (six redis-server --cluster-enabled yes,
# joined by redis-cli --cluster create); the nodes get its servers as
# redis_cluster_urls (sharded pub/sub backbone, keys spread over the masters).
#
# `up` prints the addresses and writes them to DIR/env (shell syntax):
# LB_URL, NODE_URLS (space-separated), REDIS_URL (or REDIS_CLUSTER_URLS,
# comma-separated), NATS_URL, and the pid files DIR/*.pid. Extra gateway
# settings pass through the environment (GATEWAY_*).
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
case "$backbone" in
  redis | nats | redis-cluster) ;;
  *) echo "cluster.sh: --backbone must be redis, nats or redis-cluster, not $backbone" >&2; exit 2 ;;
esac

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# A free port for a Redis Cluster server: at most 55535, with its cluster
# bus port (+10000) free too.
free_cluster_port() {
  python3 -c '
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
    if p > 55535:
        continue
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", p + 10000))
    except OSError:
        continue
    print(p)
    break'
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

wait_redis() { # port
  local i
  for ((i = 0; i < 50; i++)); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "cluster.sh: redis-server on $1 did not come up" >&2
  return 1
}

# Six redis-server --cluster-enabled yes (each with its own directory for
# nodes.conf), made three masters with a replica each; sets cluster_urls.
redis_cluster() {
  local ports=() addrs=() urls=() n port
  for ((n = 1; n <= 6; n++)); do
    port=$(free_cluster_port)
    mkdir -p "$dir/redis-cluster-$n"
    rm -f "$dir/redis-cluster-$n/nodes.conf"
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
      --dir "$dir/redis-cluster-$n" --daemonize no --logfile "$dir/redis-cluster-$n.log" &
    echo $! > "$dir/redis-cluster-$n.pid"
    ports+=("$port"); addrs+=("127.0.0.1:$port"); urls+=("redis://127.0.0.1:$port")
  done
  for port in "${ports[@]}"; do wait_redis "$port"; done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
    > "$dir/redis-cluster-create.log" 2>&1 ||
    { echo "cluster.sh: redis-cli --cluster create failed (see $dir/redis-cluster-create.log)" >&2; return 1; }
  # Every server agrees the cluster is whole before a node connects.
  for port in "${ports[@]}"; do
    for ((n = 0; n < 100; n++)); do
      redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && break
      sleep 0.1
    done
    redis-cli -p "$port" cluster info | grep -q '^cluster_state:ok' ||
      { echo "cluster.sh: the Redis Cluster is not ok on $port" >&2; return 1; }
  done
  cluster_urls=$(IFS=,; echo "${urls[*]}")
}

up() {
  for bin in redis-server redis-cli nats-server haproxy python3 curl; do
    command -v "$bin" >/dev/null || { echo "cluster.sh: $bin is missing (scripts/test.sh installs it)" >&2; exit 1; }
  done
  local gw="target/$profile/gateway"
  if [ ! -x "$gw" ]; then
    if [ "$profile" = release ]; then cargo build --release -p gateway; else cargo build -p gateway; fi
  fi
  mkdir -p "$dir"
  down
  local redis_port nats_port lb_port redis_env
  nats_port=$(free_port); lb_port=$(free_port)
  nats-server -a 127.0.0.1 -p "$nats_port" > "$dir/nats.log" 2>&1 &
  echo $! > "$dir/nats.pid"
  if [ "$backbone" = redis-cluster ]; then
    redis_cluster
    unset GATEWAY_REDIS_URL
    export GATEWAY_REDIS_CLUSTER_URLS="$cluster_urls"
    redis_env="REDIS_CLUSTER_URLS=$cluster_urls"
  else
    redis_port=$(free_port)
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
      --daemonize no --logfile "$dir/redis.log" &
    echo $! > "$dir/redis.pid"
    wait_redis "$redis_port"
    unset GATEWAY_REDIS_CLUSTER_URLS
    export GATEWAY_REDIS_URL="redis://127.0.0.1:$redis_port"
    redis_env="REDIS_URL=redis://127.0.0.1:$redis_port"
  fi
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
$redis_env
NATS_URL=nats://127.0.0.1:$nats_port
BACKBONE=$backbone
ENV
  echo "cluster up (backbone: $backbone, $nodes nodes, logs in $dir/)"
  cat "$dir/env"
}

case "$cmd" in
  up) up ;;
  down) down; echo "cluster down" ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
