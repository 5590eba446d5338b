#!/usr/bin/env bash
# The test command (README "Run the tests"; .ci/run calls exactly this).
#
# Installs what the tests need when it can (root with apt-get, pip), then runs every test of
# the workspace. Tools it cannot install are reported loudly; on CI (CI=true) the tests that
# need a missing tool fail instead of skipping.
#
# Needs: dig (dnsutils), named-checkzone (bind9-utils), nsd-checkzone (nsd),
# systemd-analyze (systemd), chromium, python3 with PyYAML, etcd + protoc + the protobuf
# well-known types (libprotobuf-dev) for the etcd feature, a C++ compiler (g++) for libFuzzer.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v dig >/dev/null 2>&1 || need+=(dnsutils)
command -v named-checkzone >/dev/null 2>&1 || need+=(bind9-utils)
command -v nsd-checkzone >/dev/null 2>&1 || need+=(nsd)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v c++ >/dev/null 2>&1 || need+=(g++)
# etcd-client's protos import google/protobuf/descriptor.proto (well-known types)
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: installing ${need[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # nsd's and etcd's packages may start daemons; the tests start their own.
    if command -v systemctl >/dev/null 2>&1; then systemctl stop nsd etcd >/dev/null 2>&1 || true; fi
    pkill -x nsd >/dev/null 2>&1 || true
    pkill -x etcd >/dev/null 2>&1 || true
  else
    echo "############################################################################" >&2
    echo "# tests/run.sh: WARNING: missing ${need[*]} and cannot install (not root)." >&2
    echo "# Tests that need them print SKIP (and fail when CI=true).                   " >&2
    echo "############################################################################" >&2
  fi
fi

if ! python3 -c 'import yaml' >/dev/null 2>&1; then
  echo "tests/run.sh: installing PyYAML (pip)"
  python3 -m pip install --quiet pyyaml >/dev/null 2>&1 ||
    echo "tests/run.sh: WARNING: PyYAML missing; YAML checks will SKIP (fail on CI)" >&2
fi

cargo test --workspace --all-targets --locked
cargo test --workspace --doc --locked
# dns-server replicas on etcd (feature `etcd`: needs protoc; tests start a 3-member cluster)
if command -v protoc >/dev/null 2>&1; then
  cargo test -p dns-server --features etcd --locked --test etcd --lib
else
  [ "${CI:-}" = "true" ] && { echo "tests/run.sh: ERROR: protoc missing on CI" >&2; exit 1; }
  echo "*** SKIP: protoc (protobuf-compiler) missing: etcd feature not built or tested ***" >&2
fi
# Fuzz targets (README "Fuzzing"): built, then each run briefly from its seeds; a crash fails.
bash tests/fuzz.sh "${FUZZ_SECONDS:-15}"
