#!/usr/bin/env bash
# Cluster test on a real Docker engine, as on several hosts: builds the
# cluster images locally (nothing pulled), starts compose/cluster's three
# tollgate nodes (A, B, C) with a three-member etcd cluster and a
# three-server NATS cluster, and checks from the host what callers of each
# node see: tokens, clients, routes and revocations crossing nodes (timed),
# MQTT QoS 1 and a persistent session across nodes, WAMP calls and events across nodes (timed), a
# node lost and back, a partition from etcd, a rolling restart under load.
# Prints figures. Bounded in time; removes every container, network and
# volume it made.
#
#   compose/cluster-test.sh          # skipped (exit 0) without a Docker engine
#   TOLLGATE_BIN=path compose/cluster-test.sh   # image from that static cluster build (see deploy/image/build.sh)
#   CLUSTER_TEST_KEEP=1 compose/cluster-test.sh   # leave the cluster running at the end
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
  echo "compose/cluster-test.sh: no Docker engine here; cluster test skipped"
  exit 0
fi
for tool in curl openssl docker-compose mosquitto_sub; do
  command -v "$tool" >/dev/null || { echo "compose/cluster-test.sh: needs $tool"; exit 1; }
done
/usr/bin/python3 -c 'import paho.mqtt' 2>/dev/null || { echo "compose/cluster-test.sh: needs python3-paho-mqtt"; exit 1; }
/usr/bin/python3 -c 'import autobahn.asyncio' 2>/dev/null || { echo "compose/cluster-test.sh: needs python3-autobahn"; exit 1; }

P=tollgate-cluster-test
dc() { docker-compose -p "$P" -f compose/cluster/docker-compose.yml "$@"; }
probe() { timeout 60 /usr/bin/python3 compose/cluster/probe.py "$@"; }
work=$(mktemp -d)
failures=0
summary=()
loader=
began=$SECONDS
cleanup() {
  set +e
  [ -n "$loader" ] && { touch "$work/load.stop"; wait "$loader"; }
  if [ -z "${CLUSTER_TEST_KEEP:-}" ]; then
    dc down -v --remove-orphans -t 5 >/dev/null 2>&1
    left=$(docker ps -aq --filter "label=com.docker.compose.project=$P")
    [ -n "$left" ] && { echo "WARN: containers left: $left"; docker rm -f $left >/dev/null 2>&1; }
    for net in $(docker network ls -q --filter "label=com.docker.compose.project=$P"); do docker network rm "$net" >/dev/null 2>&1; done
    for vol in $(docker volume ls -q --filter "label=com.docker.compose.project=$P"); do docker volume rm "$vol" >/dev/null 2>&1; done
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "compose/cluster-test.sh: interrupted; cleaning up"; exit 143' TERM INT
fail() { echo "FAIL: $*"; exit 1; }
# A check that does not stop the test (its failure is reported at the end).
soft_fail() { echo "FAIL: $*"; failures=$((failures + 1)); summary+=("FAIL: $*"); }
ok() { echo "ok: $*"; summary+=("ok: $*"); }
now_ms() { date +%s%3N; }

out=$(deploy/image/build.sh --cluster 2>&1) || { echo "$out"; fail "deploy/image/build.sh --cluster"; }
echo "images built in $((SECONDS - began)) s"
began=$SECONDS
compose/cluster/setup.sh >/dev/null
dc down -v --remove-orphans -t 1 >/dev/null 2>&1 || true   # a previous run's leftovers
dc up -d >"$work/up.log" 2>&1 || { cat "$work/up.log"; fail "docker-compose up"; }

declare -A http=([A]=http://127.0.0.1:28082 [B]=http://127.0.0.1:28083 [C]=http://127.0.0.1:28084)
declare -A admin=([A]=http://127.0.0.1:29090 [B]=http://127.0.0.1:29091 [C]=http://127.0.0.1:29092)
declare -A mqtt=([A]=127.0.0.1:21883 [B]=127.0.0.1:21884 [C]=127.0.0.1:21885)
declare -A wamp=([A]=ws://127.0.0.1:28180/ws [B]=ws://127.0.0.1:28181/ws [C]=ws://127.0.0.1:28182/ws)
declare -A svc=([A]=gateway-a [B]=gateway-b [C]=gateway-c)
declare -A cid
for n in A B C; do cid[$n]=$(dc ps -q "${svc[$n]}"); done
admin_token=$(cat compose/cluster/secrets/admin_token)
foo_secret=$(cat compose/cluster/secrets/foo_client_secret)
auth_admin=(-H "Authorization: Bearer $admin_token")

status() { curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$@" || true; }
token_on() { # node client secret
  curl -s --max-time 5 -u "$2:$3" -d grant_type=client_credentials "${http[$1]}/oauth2/token" |
    /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])' 2>/dev/null
}
readyz() { curl -s --max-time 3 "${admin[$1]}/readyz" || true; }
wait_ready() { # node seconds: /readyz says ready (not degraded) and the token server answers
  local end=$((SECONDS + $2))
  while [ $SECONDS -lt $end ]; do
    [ "$(readyz "$1")" = ready ] && token_on "$1" foo "$foo_secret" >/dev/null && return 0
    sleep 0.2
  done
  return 1
}
logs_of() { docker logs --tail 30 "${cid[$1]}" 2>&1; }

# 1. Up: three nodes ready on their own ports.
t0=$(now_ms)
for n in A B C; do
  wait_ready "$n" 120 || { logs_of "$n"; fail "node $n did not become ready"; }
done
ok "three nodes ready $(( $(now_ms) - t0 )) ms after docker-compose up -d returned (3 etcd members, 3 NATS servers)"

# 2. A token issued on A validates on B and C.
token=$(token_on A foo "$foo_secret") || fail "no token from A"
for _ in $(seq 60); do [ "$(status -H "Authorization: Bearer $token" "${http[C]}/bar/")" = 200 ] && break; sleep 0.5; done
for n in A B C; do
  s=$(status -H "Authorization: Bearer $token" "${http[$n]}/bar/")
  [ "$s" = 200 ] || fail "A's token on $n's /bar/: $s"
  [ "$(status "${http[$n]}/bar/")" = 401 ] || fail "$n's /bar/ without a token is not 401"
done
ok "a token issued on A validates on A, B and C (200; 401 without it)"

# 3. A client added on A (the CLI, in A's container) gets tokens on C.
out=$(docker exec "${cid[A]}" tollgate clients add cli-added --scope bar.read --audience bar -c /etc/tollgate/gateway.yaml 2>&1) ||
  fail "tollgate clients add on A: $out"
cli_secret=$(sed -n 's/^client_secret: //p' <<<"$out")
[ -n "$cli_secret" ] || fail "no secret printed by clients add: $out"
t0=$(now_ms)
for _ in $(seq 200); do token_on C cli-added "$cli_secret" >/dev/null && break; sleep 0.05; done
t=$(( $(now_ms) - t0 ))
cli_token=$(token_on C cli-added "$cli_secret") || fail "the client added on A gets no token on C"
[ "$(status -H "Authorization: Bearer $cli_token" "${http[A]}/bar/")" = 200 ] || fail "C's token for the new client on A"
ok "a client added on A (docker exec ... tollgate clients add) gets tokens on C ${t} ms after the CLI returned"

# 4. A route registered on B serves on A, B and C.
out=$(probe route "${admin[B]}" "$admin_token" from-b "${http[A]}" "${http[B]}" "${http[C]}") || fail "route registered on B: $out"
ok "a route registered on B (POST /admin/routes) serves on every node: $out after the POST began"

# 5. A revocation on C is refused on A.
rtoken=$(token_on A foo "$foo_secret")
[ "$(status -H "Authorization: Bearer $rtoken" "${http[A]}/bar/")" = 200 ] || fail "a fresh token on A"
t0=$(now_ms)
s=$(status -u "foo:$foo_secret" -d "token=$rtoken" "${http[C]}/oauth2/revoke")
[ "$s" = 200 ] || fail "revoke on C answered $s"
out=$(probe until 401 "Authorization: Bearer $rtoken" "${http[A]}/bar/" "${http[B]}/bar/") || fail "the token revoked on C still passes: $out"
ok "a token revoked on C is refused (401) on $out after the revocation was sent; the other token still passes: $(status -H "Authorization: Bearer $token" "${http[A]}/bar/")"

# 6. MQTT: QoS 1 publishes on A reach a subscriber on C, none lost.
mqtt_password=$(openssl rand -hex 16)
s=$(status "${auth_admin[@]}" -H 'Content-Type: application/json' \
  -d "{\"name\":\"dev1\",\"password\":\"$mqtt_password\"}" "${admin[A]}/admin/users")
[ "$s" = 201 ] || [ "$s" = 200 ] || fail "POST /admin/users on A answered $s"
for _ in $(seq 100); do  # the user reaches C through etcd
  rc=0
  timeout 5 mosquitto_sub -h 127.0.0.1 -p "${mqtt[C]#*:}" -u dev1 -P "$mqtt_password" -t dev1/probe -C 1 -W 1 >/dev/null 2>&1 || rc=$?
  [ $rc -eq 27 ] && break   # 27: timed out waiting for a message, so C took the login and the subscription
  sleep 0.1
done
# Which NATS server each node uses (their monitoring port, on the bus network).
bus_ip() { docker inspect -f "{{(index .NetworkSettings.Networks \"${P}_bus\").IPAddress}}" "$1"; }
declare -A on_nats
routes=
for s in nats1 nats2 nats3; do
  sip=$(bus_ip "$(dc ps -q "$s")")
  conns=$(curl -s --max-time 3 "http://$sip:8222/connz" || true)
  routes+="$s $(curl -s --max-time 3 "http://$sip:8222/routez" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["num_routes"])' 2>/dev/null || echo '?') routes; "
  for n in A B C; do
    grep -q "\"ip\": *\"$(bus_ip "${cid[$n]}")\"" <<<"$conns" && on_nats[$n]=$s
  done
done
echo "  NATS: ${routes}nodes connected to: A ${on_nats[A]:-?}, B ${on_nats[B]:-?}, C ${on_nats[C]:-?}"
if out=$(probe mqtt "${mqtt[A]}" "${mqtt[C]}" dev1 "$mqtt_password" 1000 2>&1); then
  out+=" (A on ${on_nats[A]:-?}, C on ${on_nats[C]:-?})"
  ok "MQTT across nodes: $out"
else
  soft_fail "MQTT across nodes (A -> C over the NATS bus): $out"
fi

# A persistent session made on A follows its client to C, with what was
# published (on B) while it was away.
if out=$(probe session "${mqtt[A]}" "${mqtt[C]}" "${mqtt[B]}" dev1 "$mqtt_password" 100 2>&1); then
  ok "MQTT session across nodes: $out"
else
  soft_fail "MQTT session across nodes (made on A, resumed on C): $out"
fi

# 7. WAMP: a callee on A serves calls made on B (handed over NATS), and
# events published on B reach a subscriber on C.
if out=$(probe wamp "${wamp[A]}" "${wamp[B]}" "${wamp[C]}" 100 2>&1); then
  ok "WAMP across nodes (callee on A, caller and publisher on B, subscriber on C): $out (A on ${on_nats[A]:-?}, B on ${on_nats[B]:-?}, C on ${on_nats[C]:-?})"
else
  soft_fail "WAMP across nodes (callee on A, caller on B, subscriber on C, over the NATS bus): $out"
fi

# 8. Node loss: B stops; A and C keep serving; B back catches up with a change made meanwhile.
t0=$(now_ms)
docker stop -t 15 "${cid[B]}" >/dev/null
stop_ms=$(( $(now_ms) - t0 ))
for n in A C; do
  [ "$(status -H "Authorization: Bearer $token" "${http[$n]}/bar/")" = 200 ] || fail "$n with B down"
done
out=$(probe route "${admin[A]}" "$admin_token" while-b-down "${http[A]}" "${http[C]}") || fail "route registered on A with B down: $out"
docker start "${cid[B]}" >/dev/null
t0=$(now_ms)
wait_ready B 60 || { logs_of B; fail "B did not come back"; }
ready_ms=$(( $(now_ms) - t0 ))
[ "$(status "${http[B]}/while-b-down/")" = 200 ] || fail "B back does not serve the route registered while it was down"
ok "node loss: B stopped (${stop_ms} ms, drained); A and C kept serving; a route registered on A meanwhile served on A, C: $out; B started again was ready in ${ready_ms} ms and serves it"

# 9. Partition: A cut off from etcd keeps serving, refuses writes, says degraded; back, it catches up.
store_net=${P}_store
docker network disconnect "$store_net" "${cid[A]}"
t0=$(now_ms)
# A write at once, before A can know it is cut off: bounded by store.etcd.timeout.
write=$(curl -s --max-time 15 -w '\n%{http_code}' "${auth_admin[@]}" -H 'Content-Type: application/json' \
  -d '{"name":"from-a-cut","match":{"path_prefix":"/from-a-cut/"},"upstream":{"targets":["http://tasks.bar:8080"]},"auth":"none"}' \
  "${admin[A]}/admin/routes" || true)
write_ms=$(( $(now_ms) - t0 ))
write_status=${write##*$'\n'}
[ "$write_status" = 503 ] || soft_fail "partition: an admin write on A answered $write_status (expected 503): ${write%$'\n'*}"
degraded=
for _ in $(seq 150); do
  r=$(readyz A)
  case "$r" in *degraded*) degraded=$r; break ;; esac
  sleep 0.1
done
[ -n "$degraded" ] || soft_fail "partition: A's /readyz never said degraded (last: $r)"
[ -n "$degraded" ] && degraded_ms=$(( $(now_ms) - t0 ))
s=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "${admin[A]}/readyz")
[ "$s" = 200 ] || soft_fail "partition: A's /readyz answered $s (expected 200, degraded)"
for path in bar/ from-b/ while-b-down/; do
  s=$(status -H "Authorization: Bearer $token" "${http[A]}/$path")
  [ "$s" = 200 ] || soft_fail "partition: A's /$path answered $s"
done
s=$(status -H "Authorization: Bearer $rtoken" "${http[A]}/bar/")
[ "$s" = 401 ] || soft_fail "partition: the revoked token passes on A ($s)"
t1=$(now_ms)
write2=$(curl -s --max-time 15 -w '\n%{http_code}' "${auth_admin[@]}" -H 'Content-Type: application/json' \
  -d '{"name":"from-a-cut2","match":{"path_prefix":"/from-a-cut2/"},"upstream":{"targets":["http://tasks.bar:8080"]},"auth":"none"}' \
  "${admin[A]}/admin/routes" || true)
write2_ms=$(( $(now_ms) - t1 ))
[ "${write2##*$'\n'}" = 503 ] || soft_fail "partition: an admin write on A once degraded answered ${write2##*$'\n'}: ${write2%$'\n'*}"
issued=$(status -u "foo:$foo_secret" -d grant_type=client_credentials "${http[A]}/oauth2/token")
echo "  A's admin write at once after the cut: $write_status in ${write_ms} ms: ${write%$'\n'*}"
echo "  A's admin write once degraded: ${write2##*$'\n'} in ${write2_ms} ms: ${write2%$'\n'*}"
out=$(probe route "${admin[B]}" "$admin_token" during-partition "${http[B]}" "${http[C]}") || soft_fail "partition: route registered on B: $out"
[ "$(status "${http[A]}/during-partition/")" = 404 ] || echo "note: A served the route registered on B while partitioned"
ok "partition (A disconnected from the etcd network): A kept serving routes and validating tokens (revoked still refused; its token endpoint answered $issued); an admin write on A at once answered $write_status in ${write_ms} ms (store.etcd.timeout), once degraded ${write2##*$'\n'} in ${write2_ms} ms (messages above); /readyz 200 \"${degraded%$'\n'}\" after ${degraded_ms:-?} ms; B registered a route meanwhile: $out"
docker network connect "$store_net" "${cid[A]}"
out=$(probe until 200 "" "${http[A]}/during-partition/") || soft_fail "partition healed: A does not serve the route registered on B meanwhile: $out"
for _ in $(seq 100); do [ "$(readyz A)" = ready ] && break; sleep 0.1; done
[ "$(readyz A)" = ready ] || soft_fail "partition healed: A's /readyz still says: $(readyz A)"
for n in A B C; do  # the writes A refused were not applied anywhere
  [ "$(status "${http[$n]}/from-a-cut/")" = 404 ] && [ "$(status "${http[$n]}/from-a-cut2/")" = 404 ] ||
    soft_fail "partition healed: a write A answered 503 is served on $n"
done
ok "partition healed: A serves the route registered on B meanwhile $out after reconnecting; /readyz: $(readyz A); the refused writes are nowhere"

# 10. Rolling restart of every node under load against all three. The
# loader calls each node's own address, as callers on a node reach its
# host-mode port (a published port on this one engine goes through
# docker-proxy, which accepts the connection and then closes it while the
# container is down: a refused connect would look like a lost request).
# Each node's file route (JWT, keys from etcd) and API route (from etcd)
# are called in turn: a node that listens before it has its keys or routes
# answers 401 or 404, which counts as a failure.
ltoken=$(token_on A foo "$foo_secret")
declare -A ip
for n in A B C; do
  ip[$n]=$(docker inspect -f "{{(index .NetworkSettings.Networks \"${P}_front\").IPAddress}}" "${cid[$n]}")
done
/usr/bin/python3 compose/cluster/probe.py load "$work/load" "$ltoken" \
  "A=http://${ip[A]}:8082/bar/,http://${ip[A]}:8082/from-b/" "B=http://${ip[B]}:8082/bar/,http://${ip[B]}:8082/from-b/" \
  "C=http://${ip[C]}:8082/bar/,http://${ip[C]}:8082/from-b/" &
loader=$!
sleep 2
: >"$work/windows"
for n in A B C; do
  a=$(date +%s.%N)
  docker restart -t 15 "${cid[$n]}" >/dev/null
  wait_ready "$n" 60 || { logs_of "$n"; fail "$n did not come back in the rolling restart"; }
  echo "$n $a $(date +%s.%N)" >>"$work/windows"
  echo "  restarted $n: ready again in $(/usr/bin/python3 -c "print(round(($(date +%s.%N) - $a) * 1000))") ms"
  sleep 2
done
touch "$work/load.stop"
wait "$loader"
loader=
if out=$(/usr/bin/python3 compose/cluster/probe.py judge "$work/load" "$work/windows"); then
  echo "$out"
  ok "rolling restart of A, B, C under load: $(tail -1 <<<"$out" | sed 's/^ *//')"
else
  echo "$out"
  soft_fail "rolling restart under load: $(grep -m1 'requests' <<<"$out" | sed 's/^ *//')"
fi

echo
echo "== summary (${P}: $((SECONDS - began)) s after the images were built) =="
printf '%s\n' "${summary[@]}"
if [ "$failures" -gt 0 ]; then
  echo "FAIL: $failures check(s) failed"
  exit 1
fi
echo PASS
