#!/usr/bin/env bash
# Redis-side cost of one replay-store append (figures in BENCHMARKS.md,
# "Replay store: Redis cost per append"). Starts a throwaway redis-server on
# a loopback port and a gateway node on it (which loads its function
# library), then times with redis-benchmark, alternating:
#   fn       the gateway's append function (life check, run_id cached per
#            Lua state) - what the gateway runs;
#   no-check the append as it was before the life check (baseline);
#   info     the life check reading INFO on every call (the rejected design);
#   fn-key   the gateway's append with an idempotency key, a new key each
#            time (redis-benchmark's __rand_int__): the lookup and the SET;
#   fn-dup   the same key every time: a retry answered from the key.
# Knobs: N=200000 requests per run, ROUNDS=3, GW=target/release/gateway.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-200000}; ROUNDS=${ROUNDS:-3}; GW=${GW:-target/release/gateway}
[ -x "$GW" ] || cargo build --release -p gateway
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
DIR=$(mktemp -d)
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" --daemonize no >"$DIR/redis.log" 2>&1 &
RPID=$!
GATEWAY_REDIS_URL="redis://127.0.0.1:$PORT" GATEWAY_ADDR=127.0.0.1:0 "$GW" --dev >"$DIR/gw.log" 2>&1 &
GPID=$!
trap 'kill $GPID $RPID 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 50); do
  F=$(redis-cli -p "$PORT" FUNCTION LIST 2>/dev/null | grep -m1 '_append$' || true)
  [ -n "$F" ] && break; sleep 0.2
done
[ -n "$F" ] || { echo "the gateway did not load its library"; cat "$DIR/gw.log"; exit 1; }
NO_CHECK=$(redis-cli -p "$PORT" SCRIPT LOAD "
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[6]
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0)
  redis.call('DEL', KEYS[2])
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], '0-' .. seq, 'd', ARGV[1], 't', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {seq, epoch}")
INFO=$(redis-cli -p "$PORT" SCRIPT LOAD "
local life = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local meta = redis.call('HMGET', KEYS[1], 'e', 'l')
local epoch = meta[1]
if (not epoch) or meta[2] ~= life then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0, 'l', life)
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], '0-' .. seq, 'd', ARGV[1], 't', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {seq, epoch}")
echo "redis-server $(redis-server --version | awk '{print $3}'), $N appends per run, 20 clients, benchmark pinned to core 1"
for round in $(seq "$ROUNDS"); do
  for v in fn no-check info fn-key fn-dup; do
    keys=(2 "{b$v}m" "{b$v}b")
    case $v in
      fn) cmd=(FCALL "$F") ;; no-check) cmd=(EVALSHA "$NO_CHECK") ;; info) cmd=(EVALSHA "$INFO") ;;
      fn-key) cmd=(FCALL "$F"); keys=(3 "{b$v}m" "{b$v}b" "{b$v}i:__rand_int__") ;;
      fn-dup) cmd=(FCALL "$F"); keys=(3 "{b$v}m" "{b$v}b" "{b$v}i:same") ;;
    esac
    out=$(taskset -c 1 redis-benchmark -p "$PORT" -n "$N" -c 20 -r 1000000000 -q "${cmd[@]}" "${keys[@]}" \
      '{"text":"hello"}' 1700000000000 1000 120000 86400000 EPOCH ch 2>/dev/null | tr '\r' '\n' | grep 'requests per second')
    rps=$(echo "$out" | sed -E 's/.*: ([0-9.]+) requests per second.*/\1/')
    printf 'round %s  %-9s %9.0f appends/s  %5.1f us each\n' "$round" "$v" "$rps" "$(awk "BEGIN{print 1000000/$rps}")"
  done
done
