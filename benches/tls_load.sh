#!/usr/bin/env bash
# TLS load comparison in one run, same certificates (ECDSA P-256 from
# `tollgate pki`), same core for each proxy, same client (examples/tlsload.rs,
# since wrk cannot present client certificates):
#   - mTLS handshakes/s: every request on a new connection, full handshake
#   - keep-alive requests/s over mTLS
# for nginx (ssl_verify_client on, proxy_pass with upstream keepalive) and
# tollgate (client_auth: required), with the ratios: medians of ROUNDS rounds
# in which the targets take turns.
#
#   benches/tls_load.sh              # needs: nginx (nginx-light), curl, taskset
#   SECONDS_PER_RUN=20 CONNS=64 ROUNDS=5 benches/tls_load.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_SECONDS=${SECONDS_PER_RUN:-10}
CONNS=${CONNS:-32}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
UP_PORT=18180 NGINX_PORT=18443 TG_PORT=18444 TG_ADMIN=19190

source benches/common.sh
require nginx curl taskset

cargo build --release --quiet --bin tollgate --example tlsload
tg=target/release/tollgate
load=target/release/examples/tlsload

$tg pki init-ca --org Bench --cn "Bench Root" --out "$work/ca" >/dev/null
$tg pki issue --ca "$work/ca" --kind server --cn localhost --san localhost --san 127.0.0.1 --out "$work/server" >/dev/null
$tg pki issue --ca "$work/ca" --kind client --cn bench --org backend --out "$work/client" >/dev/null

start_upstream "$LOAD_CPU" $UP_PORT
nginx_conf proxy "upstream up { server 127.0.0.1:$UP_PORT; keepalive 128; }
  server { listen 127.0.0.1:$NGINX_PORT ssl;
    ssl_certificate $work/server.pem; ssl_certificate_key $work/server.key;
    ssl_client_certificate $work/ca/ca.pem; ssl_verify_client on;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_set_header X-Client-Subject \$ssl_client_s_dn; } }"
taskset -c "$PROXY_CPU" nginx -q -p "$work" -c "$work/proxy.conf"

cat > "$work/gateway.yaml" <<CONF
listeners:
  - name: mtls
    bind: 127.0.0.1:$TG_PORT
    protocol: https
    tls: { cert: $work/server.pem, key: $work/server.key, client_ca: $work/ca/ca.pem }
    limits: { max_connections: 30000 }
admin: { bind: 127.0.0.1:$TG_ADMIN }
proxy: { access_log: false }
reload: { watch: false }
routes:
  - name: up
    match: { path_prefix: / }
    upstream: { targets: [http://127.0.0.1:$UP_PORT] }
CONF
TOLLGATE_LOG=warn taskset -c "$PROXY_CPU" $tg -c "$work/gateway.yaml" &
pids+=("$!")

wait_https() {
  for _ in $(seq 100); do
    curl -fs --cacert "$work/ca/ca.pem" --cert "$work/client.pem" --key "$work/client.key" \
      --resolve "localhost:$1:127.0.0.1" "https://localhost:$1/" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "not up: $1"; exit 1
}
wait_https $NGINX_PORT
wait_https $TG_PORT

declare -A RPS P99
run() { # name port mode: one round, appended to the target's figures
  local args=(--addr "127.0.0.1:$2" --ca "$work/ca/ca.pem" --cert "$work/client.pem" --key "$work/client.key" --mode "$3" --conns "$CONNS")
  taskset -c "$LOAD_CPU" $load "${args[@]}" --seconds 2 >/dev/null # warm-up
  local out
  out=$(taskset -c "$LOAD_CPU" $load "${args[@]}" --seconds "$RUN_SECONDS")
  RPS[$1]+=" $(awk '/requests\/s/ {print $2}' <<<"$out")"
  P99[$1]+=" $(awk '/p99_us/ {print $2}' <<<"$out")"
  local errors; errors=$(awk '/errors/ {print $2}' <<<"$out")
  [ "$errors" = 0 ] || echo "$1: $errors errors during the run"
}
targets=(nginx-handshake tollgate-handshake nginx-keepalive tollgate-keepalive)
for round in $(seq "$ROUNDS"); do
  run nginx-handshake $NGINX_PORT handshake
  run tollgate-handshake $TG_PORT handshake
  run nginx-keepalive $NGINX_PORT keepalive
  run tollgate-keepalive $TG_PORT keepalive
  line="round $round requests/s:"
  for t in "${targets[@]}"; do line+=" $t ${RPS[$t]##* },"; done
  echo "${line%,}"
done
for t in "${targets[@]}"; do
  RPS[$t]=$(median "${RPS[$t]}") P99[$t]=$(median "${P99[$t]}")
done

printf '\nmedians of %d rounds\n%-20s %12s %10s\n' "$ROUNDS" target "requests/s" "p99 us"
for t in "${targets[@]}"; do
  printf '%-20s %12.0f %10.0f\n' "$t" "${RPS[$t]}" "${P99[$t]}"
done
awk -v th="${RPS[tollgate-handshake]}" -v nh="${RPS[nginx-handshake]}" \
    -v tk="${RPS[tollgate-keepalive]}" -v nk="${RPS[nginx-keepalive]}" 'BEGIN {
  printf "\nmTLS handshakes/s tollgate/nginx: %.2f\n", th / nh
  printf "mTLS keep-alive requests/s tollgate/nginx: %.2f\n", tk / nk
}'
