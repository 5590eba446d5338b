#!/usr/bin/env bash
# The cognitive-system example as plain processes on loopback: one dns-server and six
# agents (cognitive-root -> perception -> visual-worker-1, visual-worker-2;
# cognitive-root -> action -> motor-worker), a temporary shared directory and temporary
# state directories. No containers needed.
#
#   examples/cognitive-system/run-local.sh            # run until Ctrl-C, print what to try
#   examples/cognitive-system/run-local.sh --check    # non-interactive smoke test, exit 0/1
#
# Binaries: $DNS_SERVER_BIN / $AGENT_BIN, else the workspace target dir
# ($CARGO_TARGET_DIR or ./target; release if built, else debug; built with cargo if missing).
# Ports: $HTTP_PORT (default 8765) and $DNS_PORT (default 5353); --check uses free ports.
# $KEEP=1 keeps the temporary directory. Needs python3 (JSON, HTTP); --check also needs dig.
set -euo pipefail

NS=cognitive-system
CHECK=0
for arg in "$@"; do
  case "$arg" in
    --check) CHECK=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--check]" >&2; exit 64 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

find_bin() { # name env-value
  local name=$1 given=$2
  if [[ -n "$given" ]]; then echo "$given"; return; fi
  for profile in release debug; do
    if [[ -x "$TARGET/$profile/$name" ]]; then echo "$TARGET/$profile/$name"; return; fi
  done
  echo "building $name (cargo build -p $name)..." >&2
  (cd "$ROOT" && cargo build -q -p "$name" >&2)
  echo "$TARGET/debug/$name"
}
DNS_SERVER=$(find_bin dns-server "${DNS_SERVER_BIN:-}")
AGENT=$(find_bin agent "${AGENT_BIN:-}")
for b in "$DNS_SERVER" "$AGENT"; do
  [[ -x "$b" ]] || { echo "run-local: $b is not executable" >&2; exit 1; }
done
command -v python3 >/dev/null || { echo "run-local: python3 is required" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cognitive-system.XXXXXX")
SHARED=$WORK/shared
mkdir -p "$SHARED" "$WORK/state"
PIDS=()
REG_PID=

cleanup() {
  local code=$?
  trap - EXIT INT TERM
  # Agents first (they deregister on SIGTERM), then the registry.
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -n "$REG_PID" ]]; then
    kill -TERM "$REG_PID" 2>/dev/null || true
    wait "$REG_PID" 2>/dev/null || true
  fi
  if [[ "${KEEP:-0}" == 1 ]]; then
    echo "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ $CHECK == 1 ]]; then HTTP=${HTTP_PORT:-0}; DNS=${DNS_PORT:-0}; else HTTP=${HTTP_PORT:-8765}; DNS=${DNS_PORT:-5353}; fi

MEMBRANE_LOG=info "$DNS_SERVER" --data-dir "$WORK/registry" \
  --http-listen "127.0.0.1:$HTTP" --dns-listen "127.0.0.1:$DNS" \
  2> "$WORK/dns-server.log" &
REG_PID=$!

# The bound addresses, from the server's log ("listening http 127.0.0.1:8765").
for _ in $(seq 1 200); do
  HTTP_ADDR=$(sed -n 's/.*listening http \([0-9.:]*\).*/\1/p' "$WORK/dns-server.log" | head -1)
  DNS_ADDR=$(sed -n 's/.*listening dns udp \([0-9.:]*\).*/\1/p' "$WORK/dns-server.log" | head -1)
  [[ -n "$HTTP_ADDR" && -n "$DNS_ADDR" ]] && break
  kill -0 "$REG_PID" 2>/dev/null || { cat "$WORK/dns-server.log" >&2; echo "run-local: dns-server exited" >&2; exit 1; }
  sleep 0.1
done
[[ -n "${HTTP_ADDR:-}" && -n "${DNS_ADDR:-}" ]] || { cat "$WORK/dns-server.log" >&2; echo "run-local: dns-server did not start" >&2; exit 1; }
URL=http://$HTTP_ADDR
DNS_PORT_BOUND=${DNS_ADDR##*:}

# id parent service port capability
MEMBRANES=(
  "cognitive-root - cognitive 7000 p-system"
  "perception cognitive-root perception 7100 perception"
  "visual-worker-1 perception visual 7101 vision"
  "visual-worker-2 perception visual 7102 vision"
  "action cognitive-root action 7200 planning"
  "motor-worker action motor 7201 motor"
)

for line in "${MEMBRANES[@]}"; do
  read -r id parent svc port cap <<< "$line"
  args=(run --id "$id" --namespace "$NS" --registry-url "$URL"
        --service "$svc:tcp:$port" --capability "$cap" --address 127.0.0.1
        --mode shared-volume --shared-dir "$SHARED" --state-dir "$WORK/state/$id")
  [[ "$parent" != - ]] && args+=(--parent "$parent")
  "$AGENT" "${args[@]}" 2> "$WORK/agent-$id.log" &
  PIDS+=($!)
done

http_get() { python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1"; }

# Wait until the six membranes are registered and passing.
registered=0
for _ in $(seq 1 100); do
  registered=$(http_get "$URL/v1/namespaces/$NS/membranes?state=passing" 2>/dev/null \
    | python3 -c 'import sys, json; print(len(json.load(sys.stdin)["membranes"]))' 2>/dev/null || echo 0)
  [[ "$registered" == 6 ]] && break
  sleep 0.2
done
if [[ "$registered" != 6 ]]; then
  tail -n 5 "$WORK"/*.log >&2
  echo "run-local: only $registered of 6 membranes registered" >&2
  exit 1
fi

if [[ $CHECK == 0 ]]; then
  cat <<EOF

cognitive-system is running: registry $URL (web page: $URL/), DNS 127.0.0.1:$DNS_PORT_BOUND
work dir $WORK (logs: *.log)

Try:
  dig @127.0.0.1 -p $DNS_PORT_BOUND SRV _visual._tcp.$NS +short
  dig @127.0.0.1 -p $DNS_PORT_BOUND PTR _services._dns-sd._udp.$NS +short
  dig @127.0.0.1 -p $DNS_PORT_BOUND TXT perception.$NS +short
  curl -s $URL/v1/namespaces/$NS/tree
  $AGENT discover --state-dir $WORK/state/perception
  $AGENT status --state-dir $WORK/state/visual-worker-1
  # message relay (agent send/recv):
  MEMBRANE_STATE_DIR=$WORK/state/perception $AGENT send visual-worker-1 "process image 1"
  MEMBRANE_STATE_DIR=$WORK/state/visual-worker-1 $AGENT recv
  $DNS_SERVER export --namespace $NS --format compose --url $URL

Ctrl-C stops everything.
EOF
  wait "$REG_PID"
  exit 0
fi

# ---- --check: a non-interactive smoke test ----
fail() { echo "CHECK FAILED: $*" >&2; exit 1; }
command -v dig >/dev/null || fail "dig is required (apt-get install dnsutils)"

dq() { dig @127.0.0.1 -p "$DNS_PORT_BOUND" +tries=2 +time=2 +short "$@"; }

# Every membrane resolvable by SRV (its service) and A.
for line in "${MEMBRANES[@]}"; do
  read -r id parent svc port cap <<< "$line"
  srv=$(dq SRV "_$svc._tcp.$NS")
  grep -q " $port $id\.$NS\.$" <<< "$srv" || fail "SRV _$svc._tcp.$NS lacks $id: $srv"
  a=$(dq A "$id.$NS")
  [[ "$a" == 127.0.0.1 ]] || fail "A $id.$NS is '$a'"
  echo "ok: SRV _$svc._tcp.$NS -> $port $id.$NS., A 127.0.0.1"
done

# The hierarchy.
http_get "$URL/v1/namespaces/$NS/tree" | python3 -c '
import json, sys
tree = json.load(sys.stdin)
def shape(nodes):
    return {n["id"]: shape(n.get("children", [])) for n in nodes}
got = shape(tree["roots"])
want = {"cognitive-root": {"perception": {"visual-worker-1": {}, "visual-worker-2": {}},
                           "action": {"motor-worker": {}}}}
if got != want:
    sys.exit("tree is %s, expected %s" % (json.dumps(got), json.dumps(want)))
' || fail "hierarchy in /v1/namespaces/$NS/tree"
echo "ok: hierarchy cognitive-root -> perception -> visual-worker-1/2, action -> motor-worker"

# agent discover, through perception's running agent.
"$AGENT" discover --state-dir "$WORK/state/perception" visual-worker-1 | python3 -c '
import json, sys
m = json.load(sys.stdin)
m = m.get("membrane", m)
# The agent answers in the shape of the reference documents (membrane_id, parent_membrane).
assert m.get("membrane_id", m.get("id")) == "visual-worker-1", m
assert m.get("parent_membrane", m.get("parent")) == "perception", m
' || fail "agent discover visual-worker-1"
n=$("$AGENT" discover --state-dir "$WORK/state/perception" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(len(d["membranes"] if isinstance(d, dict) else d))')
[[ "$n" == 6 ]] || fail "agent discover lists $n membranes, expected 6"
echo "ok: agent discover (one and all)"

# Message round trip perception -> visual-worker-1 -> perception.
"$AGENT" send --help >/dev/null 2>&1 || fail "agent send is not available"
{
  send() { MEMBRANE_STATE_DIR="$WORK/state/$1" "$AGENT" send --state-dir "$WORK/state/$1" "$2" "$3" --wait; }
  recv() { "$AGENT" recv --state-dir "$WORK/state/$1" --json; }
  send perception visual-worker-1 "process image 1" || fail "agent send visual-worker-1"
  recv visual-worker-1 | grep -q "process image 1" || fail "visual-worker-1 did not receive the message"
  send visual-worker-1 perception "image 1 done" || fail "agent send perception"
  recv perception | grep -q "image 1 done" || fail "perception did not receive the reply"
  echo "ok: relay perception -> visual-worker-1 -> perception"
}

echo "CHECK OK"
