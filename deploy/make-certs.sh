#!/bin/sh
# Certificates for mutual TLS between the model server and the bank shards (openssl, EC P-256):
#
#   deploy/make-certs.sh DIR          # makes DIR/{ca.pem, shard.pem, shard.key, model.pem, model.key}
#
#   ca.pem               a private CA (its key is deleted once both certificates are signed)
#   shard.pem/.key       every shard replica's server certificate: DNS:$HIERMEM_CERTS_SERVER_NAME (default
#                        hiermem-shard), localhost, 127.0.0.1; usable as a client too (health probes)
#   model.pem/.key       the model server's client certificate
#
# Replicas register their container IPs, so clients check the one shared name instead of the address they
# dial (HIERMEM_MODEL_BANK_TLS_SERVER_NAME=hiermem-shard). Valid $HIERMEM_CERTS_DAYS days (default 365);
# a DIR whose certificates are all present and valid for another day is kept as it is (exit 0), so this
# runs as a one-shot service on every `up`; HIERMEM_CERTS_RENEW=1 makes new ones anyway (rotation: a new
# CA too, docs/operating.md). Keys are 0600, owned by the user running the script.
set -eu
dir="${1:?usage: make-certs.sh DIR}"
name="${HIERMEM_CERTS_SERVER_NAME:-hiermem-shard}"
days="${HIERMEM_CERTS_DAYS:-365}"
command -v openssl >/dev/null || { echo "make-certs: the openssl command is missing" >&2; exit 1; }
mkdir -p "$dir"
cd "$dir"

valid() { [ -s "$1" ] && openssl x509 -in "$1" -noout -checkend 86400 >/dev/null 2>&1; }
if [ "${HIERMEM_CERTS_RENEW:-}" != 1 ] && valid ca.pem && valid shard.pem && valid model.pem && [ -s shard.key ] && [ -s model.key ]; then
  echo "make-certs: certificates in $dir are valid, kept"
  exit 0
fi

umask 077
tmp="$(mktemp -d ./.make-certs.XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
# shellcheck disable=SC2086
openssl req -x509 $ec -keyout "$tmp/ca.key" -out "$tmp/ca.pem" -days "$days" -subj "/CN=hiermem-ca" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' \
  "$name" > "$tmp/shard.ext"
printf 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n' > "$tmp/model.ext"
for who in shard model; do
  # shellcheck disable=SC2086
  openssl req $ec -keyout "$tmp/$who.key" -out "$tmp/$who.csr" -subj "/CN=hiermem-$who" 2>/dev/null
  openssl x509 -req -in "$tmp/$who.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
    -out "$tmp/$who.pem" -days "$days" -extfile "$tmp/$who.ext" 2>/dev/null
  openssl verify -CAfile "$tmp/ca.pem" "$tmp/$who.pem" >/dev/null
done
chmod 0644 "$tmp/ca.pem" "$tmp/shard.pem" "$tmp/model.pem"
chmod 0600 "$tmp/shard.key" "$tmp/model.key"
# keys first, certificates last: a reader that sees the certificates finds their keys
for f in shard.key model.key shard.pem model.pem ca.pem; do mv -f "$tmp/$f" "./$f"; done
echo "make-certs: made ca.pem, shard.pem/.key (DNS:$name), model.pem/.key in $dir, valid $days days"
