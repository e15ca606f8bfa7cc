#!/usr/bin/env bash
# Galaxy side of the project: builds (once, cached) a Galaxy 26 virtualenv, installs the
# runner plugin (galaxy/) into it, and runs its tests, the demo or the benchmark.
#
#   scripts/lib/galaxy.sh venv    build or reuse the cached virtualenv; print its directory
#   scripts/lib/galaxy.sh test    unit tests (pytest) then the end-to-end tests against a real
#                                 Galaxy server, the real worker and the running testenv
#   scripts/lib/galaxy.sh demo    one tool run through Galaxy + plugin + worker, states printed
#   scripts/lib/galaxy.sh bench   Galaxy wall time: plugin vs Galaxy's local runner
#
# test/demo/bench expect the testenv variables (AMQP_URL, KUBECONFIG, KUBECTL) exported, as
# scripts/test and scripts/demo do. Logs: target/test-logs/galaxy/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
GALAXY_VERSION=26.1.2
CACHE="${K8S_JOB_WORKER_CACHE:-$HOME/.cache/k8s-job-worker}"
glog() { printf '[galaxy] %s\n' "$*" >&2; }

# A python >= 3.10 (Galaxy 26 needs it); 3.12 preferred, the version Galaxy is tested most on.
find_python() {
  local c
  for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python python3.11 python3.13 python3 \
           "$HOME"/.pyenv/versions/3.1[0-3]*/bin/python; do
    command -v "$c" >/dev/null 2>&1 || [[ -x "$c" ]] || continue
    if "$c" -c 'import sys, venv; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 13) else 1)' 2>/dev/null; then
      command -v "$c" 2>/dev/null || echo "$c"
      return 0
    fi
  done
  cat >&2 <<'MSG'
[galaxy] error: no usable Python 3.10-3.13 found (tried python3.12, python3.11, python3.13,
python3 in PATH and ~/.pyenv/versions/3.1[0-3]*/bin/python, each with the venv module).
Galaxy 26 needs one: e.g. `apt-get install python3 python3-venv` (Debian 12: 3.11) or
`pyenv install 3.12`, then run this again.
MSG
  return 1
}

# The virtualenv: Galaxy's meta package pins ~340 dependencies, one of them (certifi
# 2026.10.19) not served by the registry, only its .post1; so the pins are installed from the
# wheel's metadata with that one corrected, then the meta wheel without its dependencies.
# Cached under $CACHE; the marker file is written last so a half-built venv is never used.
build_venv() {
  local py pyver dir marker
  py="$(find_python)"
  pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  dir="$CACHE/galaxy-$GALAXY_VERSION-py$pyver"
  marker="$dir/.k8s-job-worker-complete"
  if [[ -f "$marker" && -x "$dir/bin/python" ]]; then
    echo "$dir"
    return 0
  fi
  mkdir -p "$CACHE"
  # one build at a time (another checkout's run may be building the same cache)
  exec 9>"$CACHE/galaxy-$GALAXY_VERSION-py$pyver.lock"
  flock 9
  if [[ -f "$marker" && -x "$dir/bin/python" ]]; then
    flock -u 9
    echo "$dir"
    return 0
  fi
  glog "building the Galaxy $GALAXY_VERSION virtualenv in $dir with $py (once; a few minutes)"
  rm -rf "$dir"
  mkdir -p "$CACHE"
  "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --upgrade pip >&2
  local tmp
  tmp="$(mktemp -d)"
  "$dir/bin/python" -m pip download --quiet --no-deps -d "$tmp" "galaxy==$GALAXY_VERSION" >&2
  "$dir/bin/python" - "$tmp"/galaxy-"$GALAXY_VERSION"-*.whl >"$tmp/requirements.txt" <<'PY'
import sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
for line in wheel.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist: "):
        continue
    req = line[len("Requires-Dist: "):]
    if "extra ==" in req:
        continue
    # the registry serves only the .post1 of this pin
    req = req.replace("certifi==2026.10.19", "certifi==2026.10.19.post1")
    print(req)
PY
  "$dir/bin/python" -m pip install --quiet -r "$tmp/requirements.txt" >&2
  "$dir/bin/python" -m pip install --quiet --no-deps "$tmp"/galaxy-"$GALAXY_VERSION"-*.whl >&2
  "$dir/bin/python" -m pip install --quiet pytest >&2
  "$dir/bin/python" -c 'import galaxy.jobs.runners, kombu, pytest' >&2
  rm -rf "$tmp"
  touch "$marker"
  flock -u 9
  echo "$dir"
}

# The venv's python with this checkout's plugin installed (editable, no dependency changes).
galaxy_python() {
  local venv
  venv="$(build_venv)"
  local log="${CARGO_TARGET_DIR:-$ROOT/target}/test-logs/galaxy/pip-install.log"
  mkdir -p "$(dirname "$log")"
  "$venv/bin/python" -m pip install --no-deps --no-build-isolation -e "$ROOT/galaxy" >"$log" 2>&1 ||
    { cat "$log" >&2; return 1; }
  echo "$venv/bin/python"
}

# The worker binary the end-to-end tests run (built if missing).
worker_binary() {
  local bin="${CARGO_TARGET_DIR:-$ROOT/target}/debug/k8s-job-worker"
  if [[ ! -x "$bin" ]]; then
    glog "building the worker (cargo build --bin k8s-job-worker)"
    (cd "$ROOT" && cargo build --quiet --bin k8s-job-worker)
  fi
  echo "$bin"
}

LOGS="${CARGO_TARGET_DIR:-$ROOT/target}/test-logs/galaxy"
# Processes the harness starts register their process group here; whatever is left when
# this script exits (an interrupted run) is stopped.
export GALAXY_HARNESS_PIDS="$LOGS/pids"
stop_leftovers() {
  local f pgid
  for f in "$GALAXY_HARNESS_PIDS"/*.pid; do
    [[ -f "$f" ]] || continue
    pgid="$(cat "$f")"
    if kill -0 -- "-$pgid" 2>/dev/null; then
      glog "stopping leftover process group $pgid ($(basename "$f" .pid))"
      kill -TERM -- "-$pgid" 2>/dev/null || true
      sleep 2
      kill -KILL -- "-$pgid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
}

need_env() {
  [[ -n "${AMQP_URL:-}" && -n "${KUBECONFIG:-}" ]] || {
    echo "[galaxy] error: AMQP_URL/KUBECONFIG not set: run from scripts/test or scripts/demo, or" \
      'eval "$(scripts/testenv env | sed "s/^/export /")" first' >&2
    exit 1
  }
}

cmd="${1:-}"
case "$cmd" in
  venv) build_venv ;;
  test)
    need_env
    started=$SECONDS
    py="$(galaxy_python)"
    K8S_JOB_WORKER_BIN="$(worker_binary)"
    export K8S_JOB_WORKER_BIN
    mkdir -p "$GALAXY_HARNESS_PIDS"
    trap stop_leftovers EXIT
    cd "$ROOT/galaxy"
    glog "unit tests (pytest, Galaxy's MockApp and JobWrapper, kombu memory://)"
    "$py" -m pytest -q tests/unit
    glog "end-to-end tests (real Galaxy $GALAXY_VERSION, worker, RabbitMQ, Kubernetes; logs in $LOGS)"
    "$py" -m pytest -q -rA tests/e2e
    glog "Galaxy tests done in $((SECONDS - started)) s"
    ;;
  demo | bench)
    need_env
    py="$(galaxy_python)"
    K8S_JOB_WORKER_BIN="$(worker_binary)"
    export K8S_JOB_WORKER_BIN
    mkdir -p "$GALAXY_HARNESS_PIDS"
    trap stop_leftovers EXIT
    shift
    "$py" "$ROOT/galaxy/dev/$cmd.py" "$@"
    ;;
  *) echo "usage: $0 venv|test|demo|bench" >&2; exit 2 ;;
esac
