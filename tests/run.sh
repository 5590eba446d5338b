#!/usr/bin/env bash
# The test command (README "Run the tests"; .ci/run calls exactly this).
#
# Installs what the tests need when it can (root with apt-get, pip), then runs every test of
# the workspace. Tools it cannot install are reported loudly; on CI (CI=true) the tests that
# need a missing tool fail instead of skipping.
#
# Needs: dig (dnsutils), named-checkzone (bind9-utils), nsd-checkzone and nsd (nsd), knotd
# (knot; NSD and Knot run as zone-transfer secondaries in dns-server's process tests),
# systemd-analyze (systemd), chromium, python3 with PyYAML, etcd + protoc + the protobuf
# well-known types (libprotobuf-dev) for the etcd feature; as root also podman (+ runc,
# netavark, aardvark-dns, catatonit, iptables) and podman-compose (pip) for the compose
# test, and iproute2 for the network-namespace test; a C++ compiler (g++) for libFuzzer.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v dig >/dev/null 2>&1 || need+=(dnsutils)
command -v named-checkzone >/dev/null 2>&1 || need+=(bind9-utils)
command -v nsd-checkzone >/dev/null 2>&1 || need+=(nsd)
command -v knotd >/dev/null 2>&1 || need+=(knot)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# the agent's test of a hanging name lookup runs it in namespaces (unshare -rnm, ip)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# the agent's https registry test makes its certificates with openssl
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v c++ >/dev/null 2>&1 || need+=(g++)
# etcd-client's protos import google/protobuf/descriptor.proto (well-known types)
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
# The compose example under rootful podman (dns-server/tests/deploy/podman.rs): podman with
# runc (crun fails on hybrid cgroup hosts), netavark + aardvark-dns + iptables for the
# compose network, catatonit for `init: true`; the test writes its own containers.conf.
# The multi-host test (tests/e2e/multihost.rs) needs `ip netns` (iproute2).
if [ "$(id -u)" = 0 ]; then
  command -v podman >/dev/null 2>&1 || need+=(podman)
  command -v runc >/dev/null 2>&1 || need+=(runc)
  command -v catatonit >/dev/null 2>&1 || need+=(catatonit)
  [ -x /usr/lib/podman/netavark ] || need+=(netavark aardvark-dns)
  command -v iptables >/dev/null 2>&1 || need+=(iptables)
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
  command -v strip >/dev/null 2>&1 || need+=(binutils)
fi

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: installing ${need[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # nsd's and etcd's packages may start daemons; the tests start their own.
    if command -v systemctl >/dev/null 2>&1; then systemctl stop nsd knot etcd >/dev/null 2>&1 || true; fi
    pkill -x nsd >/dev/null 2>&1 || true
    pkill -x knotd >/dev/null 2>&1 || true
    pkill -x etcd >/dev/null 2>&1 || true
  else
    echo "############################################################################" >&2
    echo "# tests/run.sh: WARNING: missing ${need[*]} and cannot install (not root)." >&2
    echo "# Tests that need them print SKIP (and fail when CI=true).                   " >&2
    echo "############################################################################" >&2
  fi
fi

if [ "$(id -u)" = 0 ] && ! command -v podman-compose >/dev/null 2>&1; then
  echo "tests/run.sh: installing podman-compose (pip)"
  python3 -m pip install --quiet podman-compose >/dev/null 2>&1 ||
    echo "tests/run.sh: WARNING: podman-compose missing; the podman test will SKIP (fail on CI)" >&2
  # pyenv only sees a new script after a rehash
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash >/dev/null 2>&1 || true; fi
fi
if [ "$(id -u)" != 0 ]; then
  echo "############################################################################" >&2
  echo "# tests/run.sh: WARNING: not root: the podman compose test and the network-   " >&2
  echo "# namespace multi-host test print SKIP (and fail when CI=true).               " >&2
  echo "############################################################################" >&2
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
