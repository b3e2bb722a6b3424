#!/usr/bin/env bash
# Redis commands (and NATS messages) per operation, for docs/SCALING.md.
#
#   loadtest/bench-redis-commands.sh            # Redis pub/sub, then NATS
#   BACKBONES=nats N=500 loadtest/bench-redis-commands.sh
#
# Starts redis-server (and nats-server), two cluster nodes A and B (release
# build), and plain curl clients: SSE streams with HS256 user tokens on A.
# Around each step it resets Redis's statistics (CONFIG RESETSTAT), does a
# known number of operations, and prints `INFO commandstats` divided by that
# number (and, with NATS, the server's in/out message counters from /varz):
#
#   idle        two nodes, no clients, 10 s: per node per second (heartbeats)
#   connect     S SSE streams with user tokens opened on A: per connection
#   held        the same S streams idle for 10 s: per connection per second
#               beyond the idle nodes' own
#   publish     N publishes through B to the channel the streams read on A
#   publish-0   N publishes through B to a channel nobody reads
#   send        N /api/send through B to users connected on A
#   resume      the S streams reconnect with their Last-Event-ID after 10
#               more publishes (each replays 10): per resume
#
# `info` and `config` calls are left out (this script makes them).
# Light (one core, well under 30 s of it); everything it starts is stopped
# on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-200}
S=${S:-100}
BACKBONES=${BACKBONES:-"redis nats"}
GW=target/release/gateway
SECRET=bench-redis-commands-secret-0123456789
KEY=bench-key
[ -x "$GW" ] || cargo build --release -p gateway

DIR=$(mktemp -d /tmp/bench-redis-commands.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

port() { # a free port below the ephemeral range
    local p
    while :; do
        p=$((20000 + RANDOM % 8000))
        ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break
    done
    echo "$p"
}

wait_ready() {
    for _ in $(seq 1 100); do
        curl -sf "http://$1/readyz" >/dev/null && return 0
        sleep 0.1
    done
    echo "node $1 not ready" >&2
    exit 1
}

# Prints `INFO commandstats` calls divided by $2, and NATS counters.
report() { # step ops
    local step=$1 ops=$2 stats line total=0
    stats=$(redis-cli -p "$RP" INFO commandstats | tr -d '\r' | grep '^cmdstat_' |
        grep -v -E '^cmdstat_(info|config)' || true)
    line=""
    while IFS= read -r l; do
        [ -z "$l" ] && continue
        local name=${l%%:*} calls
        name=${name#cmdstat_}
        calls=${l#*calls=}
        calls=${calls%%,*}
        total=$((total + calls))
        line+=" $name $(awk -v c="$calls" -v n="$ops" 'BEGIN {printf "%.2f", c / n}')"
    done <<<"$stats"
    printf '  %-10s %s ops: %s commands per op (%s in all):%s\n' "$step" "$ops" \
        "$(awk -v c="$total" -v n="$ops" 'BEGIN {printf "%.2f", c / n}')" "$total" "$line"
    if [ -n "${MP:-}" ]; then
        local in out
        in=$(curl -s "http://127.0.0.1:$MP/varz" | grep -o '"in_msgs": *[0-9]*' | grep -o '[0-9]*$')
        out=$(curl -s "http://127.0.0.1:$MP/varz" | grep -o '"out_msgs": *[0-9]*' | grep -o '[0-9]*$')
        printf '  %-10s NATS messages per op: in %s, out %s\n' "" \
            "$(awk -v c="$((in - NATS_IN0))" -v n="$ops" 'BEGIN {printf "%.2f", c / n}')" \
            "$(awk -v c="$((out - NATS_OUT0))" -v n="$ops" 'BEGIN {printf "%.2f", c / n}')"
    fi
}

reset() {
    redis-cli -p "$RP" CONFIG RESETSTAT >/dev/null
    if [ -n "${MP:-}" ]; then
        NATS_IN0=$(curl -s "http://127.0.0.1:$MP/varz" | grep -o '"in_msgs": *[0-9]*' | grep -o '[0-9]*$')
        NATS_OUT0=$(curl -s "http://127.0.0.1:$MP/varz" | grep -o '"out_msgs": *[0-9]*' | grep -o '[0-9]*$')
    fi
}

api() { # node path body
    curl -sf -X POST -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \
        -d "$3" "http://$1$2" >/dev/null
}

for backbone in $BACKBONES; do
    PIDS=()
    MP=""
    RP=$(port)
    redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no >"$DIR/redis.log" 2>&1 &
    PIDS+=($!)
    export GATEWAY_REDIS_URL="redis://127.0.0.1:$RP"
    unset GATEWAY_NATS_URL
    if [ "$backbone" = nats ]; then
        NP=$(port)
        MP=$(port)
        nats-server -a 127.0.0.1 -p "$NP" -m "$MP" >"$DIR/nats.log" 2>&1 &
        PIDS+=($!)
        export GATEWAY_NATS_URL="nats://127.0.0.1:$NP"
    fi
    sleep 0.5
    A=127.0.0.1:$(port)
    B=127.0.0.1:$(port)
    for n in A B; do
        addr=${!n}
        GATEWAY_ADDR=$addr GATEWAY_NODE_ID=node-$n GATEWAY_JWT_SECRET=$SECRET \
            GATEWAY_API_KEYS="admin:$KEY" GATEWAY_LOG=warn GATEWAY_WORKER_THREADS=1 \
            "$GW" >"$DIR/$n.log" 2>&1 &
        PIDS+=($!)
    done
    wait_ready "$A"
    wait_ready "$B"
    echo "== $backbone backbone: redis-server $(redis-server --version | grep -o 'v=[0-9.]*'), nodes A and B ($(git rev-parse --short HEAD)), $(date -u '+%F %T UTC') =="

    reset
    sleep 10
    report idle 20 # 2 nodes x 10 s

    for i in $(seq 0 $((S - 1))); do
        GATEWAY_JWT_SECRET=$SECRET "$GW" token --user "u$i" --subscribe c >"$DIR/tok$i"
    done
    reset
    CURLS=()
    for i in $(seq 0 $((S - 1))); do
        curl -sN --max-time 300 "http://$A/sse?channel=c&token=$(cat "$DIR/tok$i")" >"$DIR/sse$i" &
        CURLS+=($!)
    done
    for i in $(seq 0 $((S - 1))); do
        for _ in $(seq 1 100); do grep -q '^event: connected' "$DIR/sse$i" && break; sleep 0.05; done
    done
    sleep 1
    report connect "$S"

    reset
    sleep 10
    # Minus the idle nodes' own (measured above), by hand: printed raw here.
    report held "$((S * 10))"

    reset
    for i in $(seq 1 "$N"); do api "$B" /api/publish "{\"channel\":\"c\",\"data\":{\"n\":$i}}"; done
    sleep 1
    report publish "$N"

    reset
    for i in $(seq 1 "$N"); do api "$B" /api/publish "{\"channel\":\"nobody\",\"data\":{\"n\":$i}}"; done
    sleep 1
    report publish-0 "$N"

    reset
    for i in $(seq 1 "$N"); do api "$B" /api/send "{\"user\":\"u$((i % S))\",\"data\":{\"n\":$i}}"; done
    sleep 1
    report send "$N"

    # Resume: every stream's last event id, then gone; 10 more publishes;
    # back with Last-Event-ID.
    kill "${CURLS[@]}" 2>/dev/null || true
    wait "${CURLS[@]}" 2>/dev/null || true
    for i in $(seq 1 10); do api "$B" /api/publish "{\"channel\":\"c\",\"data\":{\"r\":$i}}"; done
    sleep 1
    reset
    CURLS=()
    for i in $(seq 0 $((S - 1))); do
        last=$(grep '^id: ' "$DIR/sse$i" | tail -1 | cut -c5-)
        curl -sN --max-time 300 -H "Last-Event-ID: $last" \
            "http://$A/sse?channel=c&token=$(cat "$DIR/tok$i")" >"$DIR/res$i" &
        CURLS+=($!)
    done
    replayed=0
    for i in $(seq 0 $((S - 1))); do
        for _ in $(seq 1 100); do
            [ "$(grep -c '"r":' "$DIR/res$i" || true)" -ge 10 ] && break
            sleep 0.05
        done
        replayed=$((replayed + $(grep -c '"r":' "$DIR/res$i" || true)))
    done
    sleep 1
    report resume "$S"
    echo "  (resume: $replayed of $((S * 10)) missed messages replayed to the $S streams)"
    kill "${CURLS[@]}" 2>/dev/null || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
done
