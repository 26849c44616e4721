#!/usr/bin/env bash
# Generates the cluster deployments' secrets (compose/cluster/secrets/, not
# committed: foo's client secret, the admin API token) and renders
# gateway.template.yaml to config/gateway.yaml (three etcd members, three
# NATS servers: the three-node compose file and the swarm stack) and
# config-single/gateway.yaml (one of each: docker-compose.single.yml).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p secrets
chmod 700 secrets
for name in foo_client_secret admin_token; do
  if [ ! -f "secrets/$name" ]; then
    openssl rand -base64 32 | tr '+/' '-_' | tr -d '=\n' > "secrets/$name"
  fi
done
chmod 644 secrets/foo_client_secret secrets/admin_token
sha() { tr -d '\n' < "$1" | sha256sum | cut -d' ' -f1; }
render() { # dir etcd-endpoints nats-servers
  mkdir -p "$1"
  sed -e "s/FOO_SECRET_SHA256/$(sha secrets/foo_client_secret)/" \
    -e "s/ADMIN_TOKEN_SHA256/$(sha secrets/admin_token)/" \
    -e "s|ETCD_ENDPOINTS|$2|" -e "s|NATS_SERVERS|$3|" \
    gateway.template.yaml > "$1/gateway.yaml.tmp"
  mv "$1/gateway.yaml.tmp" "$1/gateway.yaml"
}
render config "[http://etcd1:2379, http://etcd2:2379, http://etcd3:2379]" "[nats://nats1:4222, nats://nats2:4222, nats://nats3:4222]"
render config-single "[http://etcd1:2379]" "[nats://nats:4222]"
echo "compose/cluster/config/gateway.yaml and config-single/gateway.yaml rendered; secrets in compose/cluster/secrets/"
