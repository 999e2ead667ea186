#!/bin/sh
# Entrypoint of the hiermem image: the first argument picks the role, the rest goes to that command.
# Every role reads its settings from the environment (HIERMEM_BANK_*, HIERMEM_MODEL_*, ...), so compose
# files and Kubernetes manifests configure the same image by env alone.
#
#   serve-bank    one shard replica of a bank (gRPC)            hiermem serve-bank ...
#   serve-model   the model server (HTTP, OpenAI-compatible)    hiermem serve-model ...
#   build         train a bank                                  hiermem build ...
#   ensure-bank   one-shot: make sure a bank exists in $HIERMEM_INIT_BANK_DIR, build it when absent
#   probe         health probe for compose healthchecks         python -m hiermem.launcher probe ...
#   hiermem-make-certs DIR: the mutual-TLS certificates (deploy/make-certs.sh)
#   anything else is executed as given (e.g. `hiermem --help`, `sh`).
set -eu

role="${1:-serve-model}"
[ "$#" -gt 0 ] && shift

# Redis password (docker-compose.yml: made by the redis service into a volume mounted read-only here):
# put it into the redis URLs that have none, redis://host:port/db -> redis://:PASSWORD@host:port/db.
if [ -n "${HIERMEM_REDIS_PASSWORD_FILE:-}" ]; then
  if [ ! -r "$HIERMEM_REDIS_PASSWORD_FILE" ]; then
    echo "hiermem-entrypoint: HIERMEM_REDIS_PASSWORD_FILE=$HIERMEM_REDIS_PASSWORD_FILE is not readable" >&2
    exit 1
  fi
  pw="$(cat "$HIERMEM_REDIS_PASSWORD_FILE")"
  for var in HIERMEM_BANK_REDIS_URL HIERMEM_MODEL_REDIS_URL HIERMEM_UP_REDIS_URL; do
    eval "url=\${$var:-}"
    case "$url" in
      *@*|"") ;;
      redis://*|rediss://*) export "$var=${url%%://*}://:$pw@${url#*://}" ;;
    esac
  done
  unset pw url
fi

case "$role" in
  serve-bank)
    # Replicas register in Redis with the address others should dial: with a wildcard bind and no
    # explicit address, advertise this container's IP (unique per replica, so `--scale` just works).
    if [ -z "${HIERMEM_BANK_ADVERTISE_ADDRESS:-}" ] && [ "${HIERMEM_BANK_HOST:-}" = "0.0.0.0" ] \
       && [ "${HIERMEM_BANK_PORT:-0}" != "0" ]; then
      ip="$(python -c 'import socket; print(socket.gethostbyname(socket.gethostname()))')"
      HIERMEM_BANK_ADVERTISE_ADDRESS="$ip:$HIERMEM_BANK_PORT"
      export HIERMEM_BANK_ADVERTISE_ADDRESS
    fi
    exec hiermem serve-bank "$@"
    ;;
  serve-model|build|up|ensure-bank)
    exec hiermem "$role" "$@"
    ;;
  probe)
    # without the other commands' imports (torch): a healthcheck answers in well under a second
    exec python -m hiermem.launcher probe "$@"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
