#!/usr/bin/env bash
# The base images the compose stack builds on, pulled from their registry where it can be
# reached, else made here as local stand-ins (compose/local/*.Dockerfile):
#
#   image the stack names       override variable      stand-in
#   rust:1.95-bookworm          KATZ_RUST_IMAGE        katz-local/rust:1.95-bookworm  (this host's Rust toolchain)
#   debian:bookworm-slim        KATZ_RUNTIME_IMAGE     katz-local/debian:bookworm     (debootstrap + docker import)
#   rabbitmq:3.13-management    KATZ_RABBITMQ_IMAGE    katz-local/rabbitmq:bookworm   (Debian's rabbitmq-server)
#   redis:7.2                   KATZ_REDIS_IMAGE       katz-local/redis:bookworm      (Debian's redis-server)
#
#   eval "$(tools/compose-images.sh)"     prints `export KATZ_…_IMAGE=…` for each stand-in it used
#
# Stand-ins are made once and kept (delete them with `docker rmi` to make them again). The base
# needs root and `debootstrap` (Debian bookworm from deb.debian.org); the Rust stand-in copies the
# toolchain that `rustc` runs here (it must be the stable one the project builds with).
# env: KATZ_DEBIAN_MIRROR (default http://deb.debian.org/debian)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mirror=${KATZ_DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { echo "compose-images: $*" >&2; }

have() { docker image inspect "$1" >/dev/null 2>&1; }

# 0 when the registry image is here or could be pulled
pulled() {
  have "$1" && return 0
  if timeout 300 docker pull -q "$1" >/dev/null 2>&1; then log "pulled $1"; return 0; fi
  log "cannot pull $1: using a local stand-in"
  return 1
}

debian_base() {
  local tag=katz-local/debian:bookworm
  have $tag && return 0
  command -v debootstrap >/dev/null || { log "debootstrap is missing (apt-get install -y debootstrap)"; exit 1; }
  local dir
  dir=$(mktemp -d /var/tmp/katz-debootstrap.XXXXXX)
  log "debootstrap bookworm from $mirror (a few minutes)"
  debootstrap --variant=minbase bookworm "$dir" "$mirror" >"$dir.log" 2>&1 \
    || { tail -20 "$dir.log" >&2; exit 1; }
  cat >"$dir/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  # like the official slim images: no recommends, no caches, no docs
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$dir/etc/apt/apt.conf.d/99katz"
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/archives/*.deb "$dir"/usr/share/doc/* "$dir"/usr/share/man/*
  tar -C "$dir" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - $tag >/dev/null
  rm -rf "$dir" "$dir.log"
  log "made $tag"
}

standin() { # NAME: builds katz-local/NAME from compose/local/NAME.Dockerfile
  local name=$1 tag=katz-local/$1:bookworm
  have "$tag" && { echo "$tag"; return 0; }
  debian_base
  log "building $tag"
  docker build -q -t "$tag" -f "$root/compose/local/$name.Dockerfile" "$root/compose/local" >/dev/null
  echo "$tag"
}

rust_standin() {
  local tag=katz-local/rust:1.95-bookworm
  have $tag && { echo $tag; return 0; }
  debian_base
  local sysroot
  sysroot=$(rustc --print sysroot)
  log "building $tag from $sysroot ($(rustc --version))"
  # the toolchain without its documentation is the build context
  printf 'share/doc\nshare/doc/**\n' >"$sysroot/.dockerignore"
  docker build -q -t $tag -f "$root/compose/local/rust.Dockerfile" "$sysroot" >/dev/null
  rm -f "$sysroot/.dockerignore"
  echo $tag
}

pulled rust:1.95-bookworm || echo "export KATZ_RUST_IMAGE=$(rust_standin)"
if ! pulled debian:bookworm-slim; then debian_base; echo "export KATZ_RUNTIME_IMAGE=katz-local/debian:bookworm"; fi
pulled rabbitmq:3.13-management || echo "export KATZ_RABBITMQ_IMAGE=$(standin rabbitmq)"
pulled redis:7.2 || echo "export KATZ_REDIS_IMAGE=$(standin redis)"
