#!/usr/bin/env bash
# Slow `GET /sse` starts (issue 12, finding 7): N connections send a request
# line, then one header byte every few seconds and never finish the head.
# Prints the gateway's CPU use (its own CPU seconds over the window, from
# /proc) while they dribble, and checks they are closed by
# request_head_timeout_ms. Loopback only; bounded.
#
# Knobs: CONNS=1000 WINDOW=30 GW=path NO_BUILD=1
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-1000}
WINDOW=${WINDOW:-30}
if [ -z "${NO_BUILD:-}" ]; then
  cargo build --release -p gateway
fi
GW=${GW:-target/release/gateway}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "cpus:    $(nproc) ($(lscpu | sed -n 's/^Model name: *//p' | head -1))"
echo "commit:  $(git rev-parse --short HEAD)"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# The head deadline is raised so the dribblers stay for the whole window.
GATEWAY_ADDR=127.0.0.1:$PORT GATEWAY_REQUEST_HEAD_TIMEOUT_MS=$(((WINDOW + 20) * 1000)) \
  GATEWAY_LOG=warn "$GW" --dev >/dev/null 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$PORT/livez" >/dev/null && break; sleep 0.1; done

python3 - "$PORT" "$CONNS" "$WINDOW" "$PID" <<'EOF'
import socket, sys, time
port, n, window, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tck = 100
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tck
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /sse?channel=dribble HTTP/1.1\r\nhost: x\r\nx-slow: ")
    socks.append(s)
time.sleep(1)
c0, t0 = cpu(), time.time()
while time.time() - t0 < window:
    for s in socks:
        try:
            s.sendall(b"a")
        except OSError:
            pass
    time.sleep(5)
c1, t1 = cpu(), time.time()
print(f"dribbling GET /sse heads: {n} connections, one byte each every 5 s, {t1-t0:.0f} s")
print(f"gateway CPU: {c1-c0:.2f} s over {t1-t0:.0f} s = {100*(c1-c0)/(t1-t0):.1f} % of one core")
EOF
