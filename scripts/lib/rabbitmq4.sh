#!/usr/bin/env bash
# RabbitMQ 4.x for the tests, beside the machine's broker: Debian unstable's rabbitmq-server
# (4.3 at the time of writing), whose Erlang needs that release's libc, so it runs in a root
# of that release made with debootstrap (cached, like the Kubernetes build), on its own ports
# and with its own Erlang node name and port mapper.
#
#   scripts/lib/rabbitmq4.sh root     build (once) or reuse the root; print its directory
#   scripts/lib/rabbitmq4.sh start    start the broker (building the root if needed), wait for it
#   scripts/lib/rabbitmq4.sh stop     stop it and unmount what start mounted
#   scripts/lib/rabbitmq4.sh ctl ...  rabbitmqctl of that broker
#   scripts/lib/rabbitmq4.sh url      its AMQP URL
#
# Settings: RABBITMQ4_PORT (5673), RABBITMQ4_DIST_PORT (25673), RABBITMQ4_EPMD_PORT (4370),
# RABBITMQ4_SUITE (sid), K8S_JOB_WORKER_CACHE. Needs root (debootstrap, chroot, mount).
set -euo pipefail
CACHE="${K8S_JOB_WORKER_CACHE:-$HOME/.cache/k8s-job-worker}"
SUITE="${RABBITMQ4_SUITE:-sid}"
PORT="${RABBITMQ4_PORT:-5673}"
DIST_PORT="${RABBITMQ4_DIST_PORT:-25673}"
EPMD_PORT="${RABBITMQ4_EPMD_PORT:-4370}"
MIRROR="${RABBITMQ4_MIRROR:-http://deb.debian.org/debian}"
DIR="$CACHE/rabbitmq-$SUITE"
ROOTFS="$DIR/root"
NODE="rabbit4@localhost"
rlog() { printf '[rabbitmq4] %s\n' "$*" >&2; }
die() { printf '[rabbitmq4] error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Runs a command in the root with the broker's environment.
in_root() {
  chroot "$ROOTFS" env HOME=/var/lib/rabbitmq RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_PORT="$PORT" \
    RABBITMQ_DIST_PORT="$DIST_PORT" ERL_EPMD_PORT="$EPMD_PORT" "$@"
}

# The root: debootstrap (minbase), then rabbitmq-server from that release. A policy-rc.d that
# exits 101 keeps the package from starting it; /etc/hosts from the host lets Erlang resolve
# `localhost`. The marker is written last, so a half-built root is never used.
build_root() {
  local marker="$DIR/.complete"
  if [[ -f "$marker" ]]; then echo "$ROOTFS"; return; fi
  [[ $EUID -eq 0 ]] || die "building the $SUITE root needs root (debootstrap, chroot)"
  command -v debootstrap >/dev/null || {
    command -v apt-get >/dev/null || die "debootstrap is not installed"
    rlog "installing debootstrap"
    apt-get install -y -qq debootstrap >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq debootstrap >/dev/null; }
  }
  mkdir -p "$CACHE"
  exec 8>"$CACHE/rabbitmq-$SUITE.lock"
  flock 8
  if [[ -f "$marker" ]]; then echo "$ROOTFS"; return; fi
  rm -rf "$DIR"
  mkdir -p "$DIR"
  rlog "debootstrap $SUITE into $ROOTFS (once; about a minute)"
  debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$DIR/debootstrap.log" 2>&1 ||
    { tail -20 "$DIR/debootstrap.log" >&2; die "debootstrap failed (log: $DIR/debootstrap.log)"; }
  printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
  chmod +x "$ROOTFS/usr/sbin/policy-rc.d"
  cp /etc/hosts "$ROOTFS/etc/hosts"
  cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
  # A mirror's unstable Release file can be older than its Valid-Until.
  local apt=(-o Acquire::Check-Valid-Until=false)
  rlog "installing rabbitmq-server in the $SUITE root"
  { chroot "$ROOTFS" apt-get "${apt[@]}" update -qq &&
    chroot "$ROOTFS" env DEBIAN_FRONTEND=noninteractive apt-get "${apt[@]}" install -y -qq --no-install-recommends rabbitmq-server; } \
    >"$DIR/apt.log" 2>&1 || { tail -20 "$DIR/apt.log" >&2; die "installing rabbitmq-server failed (log: $DIR/apt.log)"; }
  chroot "$ROOTFS" dpkg-query -W -f '${Version}\n' rabbitmq-server >"$DIR/version"
  rlog "rabbitmq-server $(cat "$DIR/version") in $ROOTFS"
  touch "$marker"
  flock -u 8
  echo "$ROOTFS"
}

mount_into_root() {
  local m
  for m in proc dev; do
    mountpoint -q "$ROOTFS/$m" && continue
    case "$m" in
      proc) mount -t proc proc "$ROOTFS/proc" ;;
      dev) mount --bind /dev "$ROOTFS/dev" ;;
    esac
  done
}

unmount_from_root() {
  local m
  for m in dev proc; do
    mountpoint -q "$ROOTFS/$m" && umount -l "$ROOTFS/$m" || true
  done
}

cmd_start() {
  build_root >/dev/null
  if port_open "$PORT"; then rlog "a broker answers on :$PORT already"; return; fi
  mount_into_root
  cp /etc/hosts "$ROOTFS/etc/hosts"
  # A fresh node every start: no queues or messages of an earlier run.
  rm -rf "$ROOTFS/var/lib/rabbitmq/mnesia"
  in_root rabbitmq-server -detached >"$DIR/start.log" 2>&1 || { cat "$DIR/start.log" >&2; die "rabbitmq-server did not start"; }
  local deadline=$((SECONDS + 90))
  until in_root rabbitmqctl -q await_startup >/dev/null 2>&1 && port_open "$PORT"; do
    ((SECONDS < deadline)) || die "RabbitMQ $(cat "$DIR/version") did not open :$PORT within 90 s"
    sleep 1
  done
  rlog "RabbitMQ $(cat "$DIR/version") ready on :$PORT"
}

cmd_stop() {
  [[ -d "$ROOTFS" ]] || return 0
  if port_open "$PORT"; then
    in_root rabbitmqctl -q stop >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 30))
    while port_open "$PORT" && ((SECONDS < deadline)); do sleep 0.5; done
    rlog "stopped"
  fi
  # Erlang's port mapper of the root outlives the node.
  pkill -f "epmd.*-port $EPMD_PORT" 2>/dev/null || true
  in_root epmd -kill >/dev/null 2>&1 || true
  unmount_from_root
}

case "${1:-}" in
  root) build_root ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  ctl) shift; in_root rabbitmqctl "$@" ;;
  url) echo "amqp://guest:guest@127.0.0.1:$PORT/%2f" ;;
  *) echo "usage: $0 root|start|stop|ctl ...|url" >&2; exit 2 ;;
esac
