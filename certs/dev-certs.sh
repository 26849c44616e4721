#!/usr/bin/env bash
# A development PKI: a CA, a server certificate for localhost and two client
# certificates with different organisations (backend, frontend), and an empty
# CRL. Uses `tollgate pki`; set TOLLGATE to a built binary to skip cargo.
set -euo pipefail
[ -n "${TOLLGATE:-}" ] && TOLLGATE=$(realpath "$TOLLGATE")
cd "$(dirname "$0")"
if [ -n "${TOLLGATE:-}" ]; then
  tg() { "$TOLLGATE" "$@"; }
else
  tg() { cargo run --quiet --release -- "$@"; }
fi

if [ -f ca/ca.key ]; then
  echo "keeping the existing CA in certs/ca"
else
  tg pki init-ca --org tollgate-dev --cn "tollgate dev CA" --days 825 --out ca
fi
tg pki issue --ca ca --kind server --cn localhost --org tollgate-dev \
  --san localhost --san 127.0.0.1 --san ::1 --days 90 --out server
tg pki issue --ca ca --kind client --cn orders --org backend \
  --san spiffe://tollgate.dev/backend/orders --days 90 --out backend
tg pki issue --ca ca --kind client --cn web --org frontend \
  --san spiffe://tollgate.dev/frontend/web --days 90 --out frontend
tg pki crl --ca ca --days 30 --out ca.crl
