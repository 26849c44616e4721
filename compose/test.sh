#!/usr/bin/env bash
# Deployment test on a real Docker engine: builds the images locally, deploys
# compose/stack.yml on a swarm (initialised here when the engine is not in
# one, and left again at the end), and checks from the host what a node's
# callers see. Falls back to compose/docker-compose.yml when swarm mode
# cannot run. Bounded in time; removes what it created.
#
#   compose/test.sh                  # skipped (exit 0) without a Docker engine
#   DEPLOY_TEST_MODE=compose compose/test.sh   # the compose path even where swarm runs
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
  echo "compose/test.sh: no Docker engine here; deployment test skipped"
  exit 0
fi
for tool in curl python3 openssl; do
  command -v "$tool" >/dev/null || { echo "compose/test.sh: needs $tool"; exit 1; }
done

STACK=tollgate-test
created_swarm=no
mode=swarm
loader=
marks=$(mktemp -d)
fail() { echo "FAIL: $*"; exit 1; }
cleanup() {
  set +e
  [ -n "$loader" ] && kill "$loader" 2>/dev/null
  rm -rf "$marks"
  if [ "$mode" = swarm ]; then
    docker stack rm "$STACK" >/dev/null 2>&1
    for _ in $(seq 60); do
      [ -z "$(docker ps -q --filter "label=com.docker.stack.namespace=$STACK")" ] && break
      sleep 1
    done
    docker config rm "${STACK}_gateway_yaml_v2" >/dev/null 2>&1
    docker volume rm "${STACK}_tollgate-data" >/dev/null 2>&1
    [ "$created_swarm" = yes ] && docker swarm leave --force >/dev/null 2>&1
  else
    docker-compose -p "$STACK" -f compose/docker-compose.yml down -v >/dev/null 2>&1
  fi
  [ -n "$(docker ps -q --filter "label=com.docker.stack.namespace=$STACK")" ] && echo "WARN: containers left running"
}
trap cleanup EXIT

deploy/image/build.sh
compose/setup.sh >/dev/null

if [ "${DEPLOY_TEST_MODE:-swarm}" = compose ]; then
  mode=compose
elif [ "$(docker info -f '{{.Swarm.LocalNodeState}}')" != active ]; then
  if out=$(docker swarm init --advertise-addr 127.0.0.1 2>&1); then
    created_swarm=yes
  else
    echo "swarm mode unavailable (docker swarm init --advertise-addr 127.0.0.1: $out); testing with compose"
    mode=compose
  fi
fi

if [ "$mode" = swarm ]; then
  (cd compose && docker stack deploy -c stack.yml "$STACK" >/dev/null)
else
  docker-compose -p "$STACK" -f compose/docker-compose.yml up -d >/dev/null
fi

# Within a bounded time: the gateway answers (401 on bar without a token).
status() { curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$@" || true; }
for _ in $(seq 90); do
  [ "$(status localhost:8082/bar/)" = 401 ] && break
  sleep 1
done
[ "$(status localhost:8082/bar/)" = 401 ] || fail "the gateway did not come up on localhost:8082"
echo "ok: gateway answers on localhost:8082"

secret=$(cat compose/secrets/foo_client_secret)
token_of() {
  curl -s --max-time 5 -u "foo:$secret" -d grant_type=client_credentials localhost:8082/oauth2/token \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}
token=$(token_of) || fail "no token for foo"
echo "ok: token issued"
# bar's tasks come up on their own time; the gateway re-resolves tasks.bar.
for _ in $(seq 60); do
  [ "$(status -H "Authorization: Bearer $token" localhost:8082/bar/)" = 200 ] && break
  sleep 1
done
[ "$(status -H "Authorization: Bearer $token" localhost:8082/bar/)" = 200 ] || fail "bar with a token"
[ "$(status localhost:8082/bar/)" = 401 ] || fail "bar without a token should be 401"
echo "ok: bar through the gateway: 200 with the token, 401 without"
if [ "$mode" = swarm ]; then
  published=$(docker service inspect -f '{{json .Endpoint.Ports}}' "${STACK}_bar")
else
  published=$(docker-compose -p "$STACK" -f compose/docker-compose.yml port bar 8080 2>/dev/null || true)
fi
case "$published" in ""|null|"[]") ;; *) fail "bar publishes a port: $published" ;; esac
echo "ok: bar is not reachable directly (no published port; only the gateway's network reaches it)"

# The example client (foo, on the node's network) got answers from bar.
for _ in $(seq 30); do
  if [ "$mode" = swarm ]; then logs=$(docker service logs "${STACK}_foo" 2>&1); else logs=$(docker-compose -p "$STACK" -f compose/docker-compose.yml logs foo 2>&1); fi
  grep -q "bar answered" <<<"$logs" && break
  sleep 1
done
grep -q "bar answered" <<<"$logs" || fail "foo never reached bar: $logs"
echo "ok: foo gets a token and calls bar through localhost:8082"

# A config change rolled out: a new route is served.
sed 's|^routes:|routes:\n  - name: bar-v2\n    match: { path_prefix: /v2/bar/ }\n    strip_prefix: true\n    upstream: { targets: ["http://tasks.bar:8080"] }\n    auth: jwt\n    providers: [local]|' \
  compose/config/gateway.yaml > "$marks/gateway.v2.yaml"
if [ "$mode" = swarm ]; then
  docker config create "${STACK}_gateway_yaml_v2" "$marks/gateway.v2.yaml" >/dev/null
  docker service update --quiet --detach=false \
    --config-rm "${STACK}_gateway_yaml" \
    --config-add "source=${STACK}_gateway_yaml_v2,target=/etc/tollgate/gateway.yaml" \
    "${STACK}_gateway" >/dev/null
else
  # The config directory is mounted and watched: a file renamed in place reloads.
  cp "$marks/gateway.v2.yaml" compose/config/gateway.yaml.new
  mv compose/config/gateway.yaml.new compose/config/gateway.yaml
fi
for _ in $(seq 60); do
  [ "$(status -H "Authorization: Bearer $token" localhost:8082/v2/bar/)" = 200 ] && break
  sleep 1
done
[ "$(status -H "Authorization: Bearer $token" localhost:8082/v2/bar/)" = 200 ] || fail "the new route is not served"
echo "ok: config change rolled out; the new route is served (the old token still passes: same signing key)"

# A rolling restart under continuous requests: count what was lost.
if [ "$mode" = swarm ]; then
  (
    ok=0 lost=0
    end=$((SECONDS + 40))
    while [ $SECONDS -lt $end ]; do
      if [ "$(status -H "Authorization: Bearer $token" localhost:8082/bar/)" = 200 ]; then ok=$((ok + 1)); else lost=$((lost + 1)); fi
      [ -f "$marks/done" ] && break
      sleep 0.05
    done
    echo "$ok $lost" > "$marks/result"
  ) &
  loader=$!
  sleep 1
  docker service update --quiet --detach=false --force "${STACK}_gateway" >/dev/null
  for _ in $(seq 30); do
    [ "$(status -H "Authorization: Bearer $token" localhost:8082/bar/)" = 200 ] && break
    sleep 1
  done
  touch "$marks/done"
  wait "$loader"
  loader=
  read -r ok lost < "$marks/result"
  echo "rolling restart: $ok requests answered, $lost failed while the node's only task was replaced (stop-first: a host port has one owner)"
fi

echo "PASS ($mode)"
