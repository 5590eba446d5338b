#!/usr/bin/env bash
# Builds the example's image (both binaries, non-root uid 10001) FROM scratch out of binaries
# built on this machine: no base image is pulled, so it works offline (the Dockerfile needs
# rust:1-bookworm and debian:bookworm-slim from a registry).
#
#   examples/cognitive-system/scratch-image.sh [TAG]        # default membrane:latest
#
# The image holds dns-server, agent, the placeholder's `sleep` (coreutils) and every shared
# library `ldd` lists for them, at the paths ldd names. Binaries: DNS_SERVER_BIN and
# AGENT_BIN, else $CARGO_TARGET_DIR or target/ (release if built, else debug); debug info is
# stripped when `strip` exists. Engine: ENGINE (podman or docker), else whichever is found.
# The CI test dns-server/tests/deploy/podman.rs builds its image with this script.
set -euo pipefail
tag=${1:-membrane:latest}
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}

pick() { # pick NAME VAR: the binary from $VAR, else target/release, else target/debug
  local given=${!2:-}
  if [ -n "$given" ]; then echo "$given"; return; fi
  for p in "$target/release/$1" "$target/debug/$1"; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  echo "scratch-image.sh: no $1 binary (cargo build -p $1, or set $2)" >&2
  exit 1
}
dns_server=$(pick dns-server DNS_SERVER_BIN)
agent=$(pick agent AGENT_BIN)
sleep_bin=$(command -v sleep)
engine=${ENGINE:-}
if [ -z "$engine" ]; then
  if command -v podman >/dev/null 2>&1; then engine=podman
  elif command -v docker >/dev/null 2>&1; then engine=docker
  else echo "scratch-image.sh: neither podman nor docker found" >&2; exit 1; fi
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/usr/bin" "$ctx/rootfs/tmp" \
  "$ctx/membrane/registry" "$ctx/membrane/agent" "$ctx/membrane/shared"
chmod 1777 "$ctx/rootfs/tmp"
install_bin() { # install_bin SRC DEST: stripped of debug info when strip is there
  if command -v strip >/dev/null 2>&1; then strip --strip-debug -o "$2" "$1"; else cp "$1" "$2"; fi
  chmod 0755 "$2"
}
install_bin "$dns_server" "$ctx/rootfs/usr/local/bin/dns-server"
install_bin "$agent" "$ctx/rootfs/usr/local/bin/agent"
cp -L "$sleep_bin" "$ctx/rootfs/usr/bin/sleep"
# The libraries (and the loader) at the paths the binaries were linked against.
for b in "$dns_server" "$agent" "$sleep_bin"; do
  ldd "$b" | awk '/=> \//{print $3} /^[ \t]*\//{print $1}'
done | sort -u | while read -r lib; do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
# Debian's /lib and /lib64 are links into /usr: keep both spellings working.
for d in lib lib64; do
  if [ -d "$ctx/rootfs/$d" ] && [ ! -e "$ctx/rootfs/usr/$d" ]; then
    mv "$ctx/rootfs/$d" "$ctx/rootfs/usr/$d" && ln -s "usr/$d" "$ctx/rootfs/$d"
  fi
done
cat >"$ctx/Containerfile" <<'EOF'
FROM scratch
COPY rootfs/ /
# Owned by the runtime user: named volumes mounted here start with this ownership.
COPY --chown=10001:10001 membrane/ /var/lib/membrane/
USER 10001:10001
WORKDIR /var/lib/membrane
ENV PATH=/usr/local/bin:/usr/bin \
    MEMBRANE_DATA_DIR=/var/lib/membrane/registry \
    MEMBRANE_STATE_DIR=/var/lib/membrane/agent \
    MEMBRANE_SHARED_DIR=/var/lib/membrane/shared
EXPOSE 8765/tcp 5353/udp 5353/tcp
CMD ["dns-server", "--dns-listen", "0.0.0.0:5353", "--http-listen", "0.0.0.0:8765"]
EOF
"$engine" build --quiet -f "$ctx/Containerfile" -t "$tag" "$ctx" >/dev/null
echo "scratch-image.sh: built $tag ($engine) from $dns_server and $agent"
