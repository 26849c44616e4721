#!/usr/bin/env bash
# Generates the example deployment's secrets (compose/secrets/, not
# committed) and renders compose/config/gateway.yaml from the template.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p secrets
chmod 700 secrets
if [ ! -f secrets/tollgate_signing_key ]; then
  openssl genpkey -algorithm ed25519 -out secrets/tollgate_signing_key
fi
if [ ! -f secrets/foo_client_secret ]; then
  openssl rand -base64 32 | tr '+/' '-_' | tr -d '=\n' > secrets/foo_client_secret
fi
# The gateway runs as 65532: it must read the key (its only reader in the container).
chmod 644 secrets/tollgate_signing_key secrets/foo_client_secret
hash=$(tr -d '\n' < secrets/foo_client_secret | sha256sum | cut -d' ' -f1)
mkdir -p config
sed "s/FOO_SECRET_SHA256/$hash/" gateway.template.yaml > config/gateway.yaml.tmp
mv config/gateway.yaml.tmp config/gateway.yaml
echo "compose/config/gateway.yaml rendered; secrets in compose/secrets/"
