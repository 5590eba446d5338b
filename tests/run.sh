#!/usr/bin/env bash
# The test command (README "Run the tests"; .ci/run calls exactly this).
#
# Installs what the tests need from Debian's packages when it can (root, or CI=true), then
# runs every test of the workspace. Tools it cannot install are reported loudly; on CI a
# missing tool is an error, never a silent skip.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v dig >/dev/null 2>&1 || need_pkgs+=(dnsutils)
command -v named-checkzone >/dev/null 2>&1 || need_pkgs+=(bind9-utils)

if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: installing ${need_pkgs[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  elif [ "${CI:-}" = "true" ]; then
    echo "tests/run.sh: ERROR: CI needs ${need_pkgs[*]} but cannot install them (not root)" >&2
    exit 1
  else
    echo "############################################################################" >&2
    echo "# tests/run.sh: WARNING: ${need_pkgs[*]} missing and not root: the tests   " >&2
    echo "# that need them will print SKIP. Install them to run the full suite.       " >&2
    echo "############################################################################" >&2
  fi
fi

cargo test --workspace --all-targets --locked
cargo test --workspace --doc --locked
