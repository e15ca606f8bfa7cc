#!/usr/bin/env bash
# Builds (once) and caches the local control plane's binaries:
#   kube-apiserver, kube-controller-manager, kubectl  (Kubernetes v1.20.2, Debian bookworm source package)
#   etcd                                     (Debian bookworm etcd-server 3.4)
# using Go 1.15 from Debian bullseye, unpacked privately. Nothing is installed system-wide
# and the system's apt sources are never touched: apt runs against a private sources list
# and state directory under the cache.
#
# Usage: scripts/lib/build-k8s.sh        (prints the bin directory on success)
set -euo pipefail

CACHE="${K8S_JOB_WORKER_CACHE:-$HOME/.cache/k8s-job-worker}"
K8S_VERSION=v1.20.2
BIN="$CACHE/k8s-$K8S_VERSION/bin"
WORK="$CACHE/build"
APT="$CACHE/apt"

log() { printf '[build-k8s] %s\n' "$*" >&2; }
die() { printf '[build-k8s] error: %s\n' "$*" >&2; exit 1; }

have_all() {
  [[ -x "$BIN/kube-apiserver" && -x "$BIN/kube-controller-manager" && -x "$BIN/kubectl" && -x "$BIN/etcd" ]]
}

if have_all; then
  echo "$BIN"
  exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found: this build recipe needs a Debian-based system.
  Alternatives: put kube-apiserver, kube-controller-manager (v1.20.x) and etcd (3.4) into $BIN yourself,
  or point the tests at an existing cluster (see README, 'Using an existing cluster or broker')."
for tool in dpkg-source dpkg-deb make rsync gcc; do
  command -v "$tool" >/dev/null || {
    if [[ $EUID -eq 0 ]]; then
      log "installing build tools (dpkg-dev rsync make gcc)"
      apt-get update -qq && apt-get install -y -qq dpkg-dev rsync make gcc >/dev/null
      break
    else
      die "'$tool' is missing; install: sudo apt-get install dpkg-dev rsync make gcc"
    fi
  }
done

# The mirror is read from the system's own apt configuration, so this script names no host.
mirror=""
if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
if [[ -z "$mirror" && -f /etc/apt/sources.list ]]; then
  mirror=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
fi
[[ -n "$mirror" ]] || die "could not find a Debian mirror in /etc/apt/sources.list(.d); set DEBIAN_MIRROR"
mirror="${DEBIAN_MIRROR:-$mirror}"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f "$keyring" ]] || die "$keyring missing; install debian-archive-keyring"

mkdir -p "$APT"/{lists/partial,cache/archives/partial,etc} "$WORK" "$BIN"
cat >"$APT/etc/sources.list" <<EOF
deb [signed-by=$keyring] $mirror bookworm main
deb-src [signed-by=$keyring] $mirror bookworm main
deb [signed-by=$keyring] $mirror bullseye main
EOF
apt_private=(
  -o "Dir::Etc::SourceList=$APT/etc/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$APT/lists"
  -o "Dir::Cache=$APT/cache"
  -o "Dir::State::status=/var/lib/dpkg/status"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=root"
  -o "APT::Get::AllowUnauthenticated=false"
)
log "refreshing private apt lists (bookworm + bullseye) from $mirror"
apt-get "${apt_private[@]}" update -qq >/dev/null

cd "$WORK"
# etcd: bookworm's etcd-server, unpacked (not installed).
if [[ ! -x "$BIN/etcd" ]]; then
  log "fetching etcd-server"
  rm -f etcd-server_*.deb
  apt-get "${apt_private[@]}" download -qq etcd-server/bookworm
  rm -rf etcd-root && dpkg -x etcd-server_*.deb etcd-root
  cp etcd-root/usr/bin/etcd "$BIN/etcd"
fi

# Go 1.15: bullseye's golang-1.15-go + golang-1.15-src, unpacked privately.
GOROOT_DIR="$WORK/go-root/usr/lib/go-1.15"
if [[ ! -x "$GOROOT_DIR/bin/go" ]]; then
  log "fetching Go 1.15 (bullseye)"
  rm -f golang-1.15-*.deb
  apt-get "${apt_private[@]}" download -qq golang-1.15-go/bullseye golang-1.15-src/bullseye
  rm -rf go-root
  for deb in golang-1.15-*.deb; do dpkg -x "$deb" go-root; done
fi
[[ -x "$GOROOT_DIR/bin/go" ]] || die "Go 1.15 not found after unpacking"

# Kubernetes source (bookworm: 1.20.5+really1.20.2, full upstream tree with vendor/).
SRC_PARENT="$WORK/gopath/src/k8s.io"
if [[ ! -d "$SRC_PARENT/kubernetes/vendor" ]]; then
  log "fetching the kubernetes source package"
  rm -rf "$WORK/src-pkg" && mkdir -p "$WORK/src-pkg" && cd "$WORK/src-pkg"
  apt-get "${apt_private[@]}" source -qq --download-only kubernetes/bookworm
  dpkg-source --no-check -x kubernetes_*.dsc kubernetes >/dev/null
  mkdir -p "$SRC_PARENT" && rm -rf "$SRC_PARENT/kubernetes"
  mv kubernetes "$SRC_PARENT/kubernetes"
  cd "$WORK" && rm -rf "$WORK/src-pkg"
fi

log "building kube-apiserver, kube-controller-manager and kubectl with Go 1.15 (5-15 min on 2 cores)"
cd "$SRC_PARENT/kubernetes"
export GOROOT="$GOROOT_DIR" GOPATH="$WORK/gopath" GO111MODULE=off GOFLAGS=-mod=vendor
export PATH="$GOROOT/bin:$PATH"
unset GOFLAGS
export KUBE_GIT_VERSION="$K8S_VERSION" KUBE_GIT_TREE_STATE=clean
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kubectl" >"$WORK/make.log" 2>&1 || {
  tail -40 "$WORK/make.log" >&2
  die "kubernetes build failed (full log: $WORK/make.log)"
}
out="_output/local/bin/$(go env GOOS)/$(go env GOARCH)"
for b in kube-apiserver kube-controller-manager kubectl; do
  # Copy then rename: a running binary cannot be overwritten in place ("text file busy").
  cp "$out/$b" "$BIN/.$b.new" && mv -f "$BIN/.$b.new" "$BIN/$b"
done
have_all || die "binaries missing after build"
log "cached in $BIN"
echo "$BIN"
