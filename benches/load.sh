#!/usr/bin/env bash
# Load comparison in one run: the same small upstream reached directly, through
# nginx (proxy_pass with upstream keepalive) and through tollgate. nginx runs
# twice: as commonly configured (it adds X-Forwarded-For only), and as
# `nginx-headers`, doing the header work tollgate does on every request
# (X-Forwarded-*, Forwarded, Via both ways, a generated x-request-id both
# ways). `nginx-token` is nginx sent what tollgate-jwt is sent (the bearer
# token, some 250 bytes more per request), which it passes on unchecked. Each proxy is
# pinned to the same core; the load generator and the upstream share the other.
# The targets take turns for ROUNDS rounds, and each figure is the median of
# its rounds: on a shared VM one run can be 20% off the next.
# Prints requests/s and p50/p99 latency for each, the ratios, and tollgate's
# RSS idle and with 10k idle keep-alive connections.
#
#   benches/load.sh                 # needs: nginx (nginx-light), wrk, python3
#   DURATION=30s CONNS=128 ROUNDS=5 benches/load.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
IDLE_CONNS=${IDLE_CONNS:-10000}
UP_PORT=18080 NGINX_PORT=18081 NGINX_FULL_PORT=18083 TG_PORT=18082 TG_ADMIN=19090

source benches/common.sh
require nginx wrk python3 taskset curl

cargo build --release --quiet

start_upstream "$LOAD_CPU" $UP_PORT
nginx_conf proxy "upstream up { server 127.0.0.1:$UP_PORT; keepalive 128; }
  server { listen 127.0.0.1:$NGINX_PORT;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } }
  server { listen 127.0.0.1:$NGINX_FULL_PORT;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
      proxy_set_header Forwarded \"for=\$remote_addr;proto=\$scheme;host=\$host\";
      proxy_set_header Via \"1.1 nginx\";
      proxy_set_header X-Request-ID \$request_id;
      add_header X-Request-ID \$request_id;
      add_header Via \"1.1 nginx\"; } }"
taskset -c "$PROXY_CPU" nginx -q -p "$work" -c "$work/proxy.conf"

cat > "$work/gateway.yaml" <<CONF
listeners:
  - name: sidecar
    bind: 127.0.0.1:$TG_PORT
    limits: { max_connections: 30000 }
admin: { bind: 127.0.0.1:$TG_ADMIN }
proxy: { access_log: false }
reload: { watch: false }
auth:
  providers:
    - name: bench
      issuer: https://idp.bench
      audiences: [bench]
      public_keys: [$work/ed.pub.pem]
routes:
  - name: up
    match: { path_prefix: / }
    upstream: { targets: [http://127.0.0.1:$UP_PORT] }
  - name: jwt
    match: { path_prefix: /jwt }
    upstream: { targets: [http://127.0.0.1:$UP_PORT] }
    auth: jwt
    forward_claims: { x-user: sub }
    policy:
      - allow: { scopes: [bench.read] }
CONF
TOKEN=$(bench_token)

TOLLGATE_LOG=warn taskset -c "$PROXY_CPU" target/release/tollgate -c "$work/gateway.yaml" &
tg_pid=$!
pids+=("$tg_pid")

wait_http "http://127.0.0.1:$UP_PORT/"
wait_http "http://127.0.0.1:$NGINX_PORT/"
wait_http "http://127.0.0.1:$NGINX_FULL_PORT/"
wait_http "http://127.0.0.1:$TG_PORT/"

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
idle_rss=$(rss_kib "$tg_pid")

# to_us "1.23ms" -> microseconds
to_us() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000; else if (v ~ /s$/) print n * 1000000; else print n }'; }

declare -A RPS P50 P99
run() { # name port [path [wrk args...]]: one round, appended to the target's figures
  local name=$1 port=$2 path=${3:-/}
  shift 3 2>/dev/null || shift $#
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s "$@" "http://127.0.0.1:$port$path" >/dev/null # warm-up
  local out
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --latency "$@" "http://127.0.0.1:$port$path")
  RPS[$name]+=" $(awk '/Requests\/sec/ {print $2}' <<<"$out")"
  P50[$name]+=" $(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")"
  P99[$name]+=" $(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")"
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "$name: errors during the run:"; grep "Non-2xx\|Socket errors" <<<"$out"; fi
}
curl -fs -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$TG_PORT/jwt/" >/dev/null || { echo "the bench token is refused"; exit 1; }
for round in $(seq "$ROUNDS"); do
  run direct $UP_PORT
  run nginx $NGINX_PORT
  run nginx-headers $NGINX_FULL_PORT
  run tollgate $TG_PORT
  run tollgate-jwt $TG_PORT /jwt/ -H "Authorization: Bearer $TOKEN"
  run nginx-token $NGINX_PORT /jwt/ -H "Authorization: Bearer $TOKEN"
  echo "round $round requests/s: direct ${RPS[direct]##* }, nginx ${RPS[nginx]##* }, nginx-headers ${RPS[nginx-headers]##* }, tollgate ${RPS[tollgate]##* }, tollgate-jwt ${RPS[tollgate-jwt]##* }, nginx-token ${RPS[nginx-token]##* }"
done
for t in direct nginx nginx-headers tollgate tollgate-jwt nginx-token; do
  RPS[$t]=$(median "${RPS[$t]}") P50[$t]=$(median "${P50[$t]}") P99[$t]=$(median "${P99[$t]}")
done

printf '\nmedians of %d rounds\n%-14s %12s %10s %10s\n' "$ROUNDS" target "requests/s" "p50 us" "p99 us"
for t in direct nginx nginx-headers tollgate tollgate-jwt nginx-token; do
  printf '%-14s %12.0f %10.0f %10.0f\n' "$t" "${RPS[$t]}" "${P50[$t]}" "${P99[$t]}"
done
awk -v tr="${RPS[tollgate]}" -v nr="${RPS[nginx]}" -v hr="${RPS[nginx-headers]}" -v t99="${P99[tollgate]}" -v n99="${P99[nginx]}" -v h99="${P99[nginx-headers]}" -v d99="${P99[direct]}" 'BEGIN {
  printf "\nthroughput tollgate/nginx: %.2f; tollgate/nginx-headers: %.2f\n", tr / nr, tr / hr
  printf "added p99 (us): tollgate %.0f, nginx %.0f, nginx-headers %.0f\n", t99 - d99, n99 - d99, h99 - d99
}'
awk -v j="${RPS[tollgate-jwt]}" -v tr="${RPS[tollgate]}" -v nr="${RPS[nginx]}" -v hr="${RPS[nginx-headers]}" -v kr="${RPS[nginx-token]}" 'BEGIN {
  printf "JWT-validated throughput: %.2f of tollgate without auth, %.2f of nginx, %.2f of nginx-headers (no auth)\n", j / tr, j / nr, j / hr
  printf "  and %.2f of nginx-token (nginx sent the same requests, token and all, which it passes on unchecked)\n", j / kr
}'

# Memory with many idle keep-alive connections.
python3 - "$TG_PORT" "$IDLE_CONNS" "$work/ready" <<'PY' &
import asyncio, sys
port, n, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
async def one():
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n")
    await w.drain()
    await r.readuntil(b"ok\n")
    return r, w
async def main():
    conns = []
    for i in range(0, n, 500):
        conns += await asyncio.gather(*(one() for _ in range(min(500, n - i))))
    open(ready, "w").write(str(len(conns)))
    await asyncio.sleep(30)
asyncio.run(main())
PY
py_pid=$!
pids+=("$py_pid")
for _ in $(seq 300); do [ -f "$work/ready" ] && break; sleep 0.1; done
[ -f "$work/ready" ] || { echo "idle connections did not come up"; exit 1; }
sleep 1
busy_rss=$(rss_kib "$tg_pid")
active=$(curl -fs "http://127.0.0.1:$TG_ADMIN/metrics" | awk '/^tollgate_transport_active_connections\{listener="sidecar"\}/ {print $2}')
kill "$py_pid" 2>/dev/null || true

printf '\ntollgate RSS: idle %d KiB; with %s idle keep-alive connections (gateway counts %s open) %d KiB (%.1f KiB per connection)\n' \
  "$idle_rss" "$(cat "$work/ready")" "$active" "$busy_rss" "$(awk -v a="$busy_rss" -v b="$idle_rss" -v n="$(cat "$work/ready")" 'BEGIN { print (a - b) / n }')"
