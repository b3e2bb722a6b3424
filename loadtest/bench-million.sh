#!/usr/bin/env bash
# A million concurrent connections on this machine (issue 15, item 1).
#
#   flock /tmp/heavy.lock loadtest/bench-million.sh            # Redis, then NATS
#   BACKBONES=redis CONNECTIONS=200000 NODES=12 loadtest/bench-million.sh
#
# As root: applies and prints the kernel settings a million loopback
# connections need (two sockets each, both ends on this machine), runs
# `loadtest million` once per backbone (redis-server, nats-server, NODES
# gateway nodes, worker processes; everything it starts dies with it), then
# puts back every setting it changed and says so. A setting it cannot put
# back safely (conntrack while the table still holds the run's entries) is
# named with the command that restores it.
#
# Knobs (environment): CONNECTIONS (1000000), NODES (56), BACKBONES
# ("redis nats"), HOLD (60 s), BROADCASTS (30), RATE (connections/s, 6000),
# UNICAST_EVERY (1000), EXTRA (more `loadtest million` flags), NO_BUILD=1,
# OUT (target/million).
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTIONS=${CONNECTIONS:-1000000}
NODES=${NODES:-56}
BACKBONES=${BACKBONES:-"redis nats"}
HOLD=${HOLD:-60}
BROADCASTS=${BROADCASTS:-30}
RATE=${RATE:-6000}
UNICAST_EVERY=${UNICAST_EVERY:-1000}
EXTRA=${EXTRA:-}
OUT=${OUT:-target/million}

if [ "$(id -u)" != 0 ]; then
    echo "bench-million: needs root (kernel settings)" >&2
    exit 1
fi
if [ -z "${NO_BUILD:-}" ]; then
    cargo build --release -p gateway -p loadtest
fi

# --- kernel settings -------------------------------------------------------
declare -a RESTORE=()
set_sysctl() { # key value why
    local key=$1 want=$2 why=$3 old
    old=$(sysctl -n "$key" 2>/dev/null | tr -s '\t ' ' ') || {
        echo "  $key: not present here ($why)"
        return
    }
    if [ "$old" = "$want" ]; then
        echo "  $key = $old (already; $why)"
        return
    fi
    sysctl -q -w "$key=$want"
    echo "  $key: $old -> $want ($why)"
    RESTORE+=("$key=$old")
}
echo "kernel settings (before -> now):"
set_sysctl fs.file-max 4194304 "system-wide open files: 2 per connection"
set_sysctl net.core.somaxconn 65535 "accept queue cap; the nodes ask for listen_backlog"
set_sysctl net.ipv4.tcp_max_syn_backlog 65535 "half-open connections per listener during the connect phase"
set_sysctl net.core.netdev_max_backlog 65536 "loopback packets queue per CPU here; a broadcast to a million sends a million segments"
# Pages of 4 KiB: pressure at 4 GiB, hard limit 6 GiB of socket buffers
# (the default, about 1.5 / 2.2 GiB, throttles two million sockets).
set_sysctl net.ipv4.tcp_mem "786432 1048576 1572864" "TCP buffer memory, pages: low pressure max"
set_sysctl net.netfilter.nf_conntrack_max $((CONNECTIONS * 2 + 262144)) "conntrack entries, one per loopback connection when tracking is on"
HASH=/sys/module/nf_conntrack/parameters/hashsize
OLD_HASH=""
if [ -w "$HASH" ]; then
    OLD_HASH=$(cat "$HASH")
    WANT_HASH=$((CONNECTIONS / 2))
    if [ "$OLD_HASH" -lt "$WANT_HASH" ]; then
        echo "$WANT_HASH" >"$HASH"
        echo "  nf_conntrack hashsize: $OLD_HASH -> $(cat "$HASH") (buckets)"
    else
        echo "  nf_conntrack hashsize = $OLD_HASH (already)"
        OLD_HASH=""
    fi
else
    echo "  nf_conntrack module not loaded: no hashsize to set"
fi
echo "  net.ipv4.ip_local_port_range = $(sysctl -n net.ipv4.ip_local_port_range | tr -s '\t ' ' ') (unchanged: the clients bind 200 source addresses 127.0.0.2-201, each with this whole range)"
echo "  fs.nr_open = $(sysctl -n fs.nr_open) (unchanged: every process here stays under its 20,000-file limit; ulimit -n $(ulimit -n), hard $(ulimit -Hn))"
echo "  net.netfilter.nf_conntrack_count = $(sysctl -n net.netfilter.nf_conntrack_count 2>/dev/null || echo n/a) (0: nothing in this namespace asks for tracking, so loopback connections take no entries)"

restore() {
    echo "restoring kernel settings:"
    local kv key val
    for kv in "${RESTORE[@]}"; do
        key=${kv%%=*}
        val=${kv#*=}
        if [ "$key" = net.netfilter.nf_conntrack_max ]; then
            # Lowering it below the entries still held (TIME_WAIT) would
            # drop new loopback connections machine-wide until they expire.
            local n
            for _ in $(seq 1 60); do
                n=$(sysctl -n net.netfilter.nf_conntrack_count 2>/dev/null || echo 0)
                [ "$n" -lt "$val" ] && break
                sleep 3
            done
            if [ "$n" -ge "$val" ]; then
                echo "  $key left at $(sysctl -n "$key"): $n entries still held; restore with: sysctl -w $key=$val"
                continue
            fi
        fi
        sysctl -q -w "$key=$val"
        echo "  $key -> $val"
    done
    if [ -n "$OLD_HASH" ]; then
        echo "$OLD_HASH" >"$HASH"
        echo "  nf_conntrack hashsize -> $(cat "$HASH")"
    fi
}

PID=""
cleanup() {
    local rc=$?
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        echo "stopping the run (process group $PID)"
        kill -TERM -- "-$PID" 2>/dev/null || true
        sleep 3
        kill -KILL -- "-$PID" 2>/dev/null || true
    fi
    restore
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

counters() {
    nstat -az TcpExtListenOverflows TcpExtListenDrops TcpRetransSegs TcpExtTCPMemoryPressures \
        TcpExtTCPBacklogDrop TcpExtTCPAbortOnMemory 2>/dev/null | awk 'NR>1 {printf "%s %s; ", $1, $2}'
    local d=0 _a b _rest
    while read -r _a b _rest; do d=$((d + 16#$b)); done </proc/net/softnet_stat
    echo "softnet dropped $d"
}

status=0
for backbone in $BACKBONES; do
    dir="$OUT/$backbone"
    mkdir -p "$dir"
    echo
    echo "== $backbone backbone: $CONNECTIONS connections on $NODES nodes ($(date -u '+%F %T UTC'), commit $(git rev-parse --short HEAD)) =="
    echo "kernel counters before: $(counters)"
    # Its own process group, so the trap can stop everything it started.
    # shellcheck disable=SC2086
    setsid target/release/loadtest million --connections "$CONNECTIONS" --nodes "$NODES" \
        --backbone "$backbone" --hold "$HOLD" --broadcasts "$BROADCASTS" \
        --connect-rate "$RATE" --unicast-every "$UNICAST_EVERY" --dir "$dir" $EXTRA &
    PID=$!
    wait "$PID" || status=$?
    PID=""
    echo "kernel counters after: $(counters)"
    echo "summary: $dir/summary.txt"
done
exit $status
