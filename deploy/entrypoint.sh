#!/bin/sh
# Entrypoint of the hiermem image: the first argument picks the role, the rest goes to that command.
# Every role reads its settings from the environment (HIERMEM_BANK_*, HIERMEM_MODEL_*, ...), so compose
# files and Kubernetes manifests configure the same image by env alone.
#
#   serve-bank    one shard replica of a bank (gRPC)            hiermem serve-bank ...
#   serve-model   the model server (HTTP, OpenAI-compatible)    hiermem serve-model ...
#   build         train a bank                                  hiermem build ...
#   ensure-bank   one-shot: make sure a bank exists in $HIERMEM_INIT_BANK_DIR, build it when absent
#   probe         health probe for compose healthchecks         hiermem probe ...
#   anything else is executed as given (e.g. `hiermem --help`, `sh`).
set -eu

role="${1:-serve-model}"
[ "$#" -gt 0 ] && shift

case "$role" in
  serve-bank|serve-model|build|probe|up)
    exec hiermem "$role" "$@"
    ;;
  ensure-bank)
    exec hiermem ensure-bank "$@"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
