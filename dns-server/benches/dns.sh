#!/usr/bin/env bash
# DNS benchmark: dns-server against NSD, SRV queries, 100 services x 10 instances.
#
#   dns-server/benches/dns.sh            # full: real server, registrations over HTTP,
#                                        #       zone exported with `dns-server export`
#   dns-server/benches/dns.sh --inproc   # in-process: the `dns_serve` bench binary builds
#                                        #       the same snapshots without the HTTP API
#
# Environment: ROUNDS (3), DURATION seconds per run (10), CLIENTS (dnsperf -c, 4),
#   OUTSTANDING (dnsperf -q, 200), SOCKETS (UDP sockets of dns_serve, 2),
#   SERVICES (100), INSTANCES (10), EDNS (set to 1 to send EDNS0 queries),
#   CARGO_TARGET_DIR (target dir, default ./target),
#   MIX (full mode only): "srv" (default) queries each service type's SRV; "all" also asks
#   every membrane's own names (host A and TXT, instance SRV), which are rendered per query.
# Installs dnsperf and nsd from Debian packages when missing (needs root).
# Prints each run's q/s and CPU microseconds per query (utime+stime of the server's
# processes over the run / queries completed), then the averages and the ratios.
set -euo pipefail

MODE=full
[[ "${1:-}" == "--inproc" ]] && MODE=inproc
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-4}
OUTSTANDING=${OUTSTANDING:-200}
SOCKETS=${SOCKETS:-2}
SERVICES=${SERVICES:-100}
INSTANCES=${INSTANCES:-10}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$(mktemp -d /tmp/dns-bench.XXXXXX)
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

need() {
    local missing=()
    command -v dnsperf >/dev/null || missing+=(dnsperf)
    command -v nsd >/dev/null || missing+=(nsd)
    command -v curl >/dev/null || missing+=(curl)
    if ((${#missing[@]})); then
        echo "installing ${missing[*]} from Debian packages" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# A process and all its descendants (NSD forks xfrd, which forks main, which forks servers).
tree() {
    local c
    echo "$1"
    for c in $(pgrep -P "$1" || true); do tree "$c"; done
}

# CPU ticks (utime+stime) of a process tree.
cpu_ticks() {
    local total=0 p
    for p in $(tree "$1"); do
        if [[ -r /proc/$p/stat ]]; then
            # Fields 14 and 15 after the ")" that ends the command name.
            local t
            t=$(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')
            total=$((total + t))
        fi
    done
    echo "$total"
}

wait_dns() { # port
    for _ in $(seq 100); do
        if dig +short +time=1 +tries=1 @127.0.0.1 -p "$1" "$ZONE" SOA >/dev/null 2>&1 &&
            [[ -n "$(dig +short +time=1 +tries=1 @127.0.0.1 -p "$1" "$ZONE" SOA)" ]]; then
            return 0
        fi
        sleep 0.1
    done
    echo "no DNS answer on port $1" >&2
    return 1
}

need
command -v dig >/dev/null || {
    apt-get install -y -qq bind9-dnsutils >/dev/null
}
ZONE=bench.
QUERIES=$WORK/queries.txt

if [[ $MODE == inproc ]]; then
    (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo bench -p dns-server --bench dns_serve --no-run) >&2
    BIN=$(ls -t "$TARGET"/release/deps/dns_serve-* | grep -v '\.d$' | head -1)
    "$BIN" --bench --services "$SERVICES" --instances "$INSTANCES" --sockets "$SOCKETS" \
        --zone-dir "$WORK" --queries "$QUERIES" >"$WORK/ours.log" 2>&1 &
    OURS_PID=$!
    PIDS+=("$OURS_PID")
    for _ in $(seq 100); do grep -q '^port ' "$WORK/ours.log" && break; sleep 0.1; done
    OURS_PORT=$(awk '/^port /{print $2}' "$WORK/ours.log")
    ZONEFILE=$WORK/bench.zone
else
    (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release -p dns-server) >&2
    BIN=$TARGET/release/dns-server
    OURS_PORT=$(free_port)
    HTTP_PORT=$(free_port)
    mkdir -p "$WORK/data"
    "$BIN" --dns-listen "127.0.0.1:$OURS_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
        --data-dir "$WORK/data" >"$WORK/ours.log" 2>&1 &
    OURS_PID=$!
    PIDS+=("$OURS_PID")
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$HTTP_PORT/health" >/dev/null && break; sleep 0.1; done
    echo "registering $((SERVICES * INSTANCES)) membranes over HTTP" >&2
    : >"$QUERIES"
    for s in $(seq "$SERVICES"); do
        for i in $(seq "$INSTANCES"); do
            n=$(((s - 1) * INSTANCES + i - 1))
            curl -fs -X PUT "http://127.0.0.1:$HTTP_PORT/v1/namespaces/bench/membranes/svc$s-i$i" \
                -H 'content-type: application/json' \
                -d "{\"addresses\":[\"10.0.$((n / 250)).$((n % 250 + 1))\"],\"services\":[{\"name\":\"svc$s\",\"proto\":\"tcp\",\"port\":$((7000 + s))}],\"metadata\":{\"version\":\"1.0\"}}" \
                >/dev/null
            if [[ "${MIX:-srv}" == all ]]; then
                printf '%s\n' "svc$s-i$i.bench. A" "svc$s-i$i.bench. TXT" \
                    "svc$s-i$i._svc$s._tcp.bench. SRV" >>"$QUERIES"
            fi
        done
        echo "_svc$s._tcp.bench. SRV" >>"$QUERIES"
    done
    ZONEFILE=$WORK/bench.zone
    "$BIN" export --namespace bench --format zone --url "http://127.0.0.1:$HTTP_PORT" >"$ZONEFILE"
fi
wait_dns "$OURS_PORT"

# NSD on another loopback port, serving the exported zone.
NSD_PORT=$(free_port)
cat >"$WORK/nsd.conf" <<EOF
server:
    ip-address: 127.0.0.1@$NSD_PORT
    port: $NSD_PORT
    server-count: 1
    username: ""
    chroot: ""
    zonesdir: "$WORK"
    pidfile: "$WORK/nsd.pid"
    xfrdfile: "$WORK/xfrd.state"
    zonelistfile: "$WORK/zone.list"
    database: ""
    logfile: "$WORK/nsd.log"
    verbosity: 1
    # Debian's NSD has response rate limiting on by default: off for a benchmark.
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: bench.
    zonefile: "$ZONEFILE"
EOF
nsd-checkzone bench. "$ZONEFILE" >&2
nsd -d -c "$WORK/nsd.conf" >"$WORK/nsd.out" 2>&1 &
NSD_PID=$!
PIDS+=("$NSD_PID")
wait_dns "$NSD_PORT"

echo "records: ours $(dig +short @127.0.0.1 -p "$OURS_PORT" _svc1._tcp.bench. SRV | wc -l) SRV, nsd $(dig +short @127.0.0.1 -p "$NSD_PORT" _svc1._tcp.bench. SRV | wc -l) SRV for _svc1._tcp.bench."

HZ=$(getconf CLK_TCK)
EDNS_FLAG=()
[[ "${EDNS:-0}" == 1 ]] && EDNS_FLAG=(-e)

run() { # name port pid
    local before after out qps done_q us
    before=$(cpu_ticks "$3")
    out=$(dnsperf -s 127.0.0.1 -p "$2" -d "$QUERIES" -l "$DURATION" -c "$CLIENTS" \
        -q "$OUTSTANDING" "${EDNS_FLAG[@]}" 2>&1)
    after=$(cpu_ticks "$3")
    qps=$(awk '/Queries per second:/{print $4}' <<<"$out")
    done_q=$(awk '/Queries completed:/{print $3}' <<<"$out")
    lost=$(awk '/Queries lost:/{print $3}' <<<"$out")
    us=$(awk -v t=$((after - before)) -v hz="$HZ" -v q="$done_q" 'BEGIN{printf "%.2f", t / hz * 1e6 / q}')
    printf '%-4s q/s %10.0f  cpu_us/query %6s  completed %s lost %s\n' "$1" "$qps" "$us" "$done_q" "$lost"
    echo "$1 $qps $us" >>"$WORK/results"
}

for r in $(seq "$ROUNDS"); do
    echo "round $r"
    run ours "$OURS_PORT" "$OURS_PID"
    run nsd "$NSD_PORT" "$NSD_PID"
done

awk '
    { q[$1] += $2; c[$1] += $3; n[$1]++ }
    END {
        oq = q["ours"] / n["ours"]; nq = q["nsd"] / n["nsd"]
        oc = c["ours"] / n["ours"]; nc = c["nsd"] / n["nsd"]
        printf "average: ours %.0f q/s %.2f us/query; nsd %.0f q/s %.2f us/query\n", oq, oc, nq, nc
        printf "ratio ours/nsd q/s: %.2f   cpu efficiency (nsd us / ours us): %.2f\n", oq / nq, nc / oc
    }' "$WORK/results"
echo "server RSS: ours $(awk '/VmRSS/{print $2, $3}' /proc/$OURS_PID/status), nsd $(for p in $(tree "$NSD_PID"); do awk '/VmRSS/{print $2}' /proc/$p/status; done | awk '{s += $1} END {print s}') kB"
