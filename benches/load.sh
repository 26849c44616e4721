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
# RSS idle and with 10k idle keep-alive connections. Then the proxies run
# again capped at CAP% of a core (default 50, 0 skips; needs root for the
# cgroup): a sidecar's usual lot, and a measure of what a request costs the
# proxy itself (ONLY_CAPPED=1 runs that pass alone).
#
#   benches/load.sh                 # needs: nginx (nginx-light), wrk, python3
#   DURATION=30s CONNS=128 ROUNDS=5 benches/load.sh
#   BASELINE=/path/to/old/tollgate benches/load.sh   # also an earlier build, as `baseline`, in the same rounds
#   ACCESS_LOG=1 benches/load.sh    # every proxy writes its access log (to a file), as by default
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
IDLE_CONNS=${IDLE_CONNS:-10000}
CAP=${CAP:-50}
[[ $CAP =~ ^[0-9]+$ ]] && [ "$CAP" -le 100 ] || { echo "CAP is a share of one core in percent, 0 to 100 (0 skips the limited pass), not '$CAP'"; exit 1; }
UP_PORT=18080 NGINX_PORT=18081 NGINX_FULL_PORT=18083 TG_PORT=18082 TG_ADMIN=19090
BASE_PORT=18084 BASE_ADMIN=19091

source benches/common.sh
require nginx wrk python3 taskset curl

# Access logs: off in every proxy, or (ACCESS_LOG=1) on in every proxy,
# each to a file: nginx's default (a write per request), tollgate's own.
if [ -n "${ACCESS_LOG:-}" ]; then
  nginx_log="access_log $work/nginx-access.log;" tg_access=true tg_log=info
else
  nginx_log="" tg_access=false tg_log=warn
fi

cargo build --release --quiet

start_upstream "$LOAD_CPU" $UP_PORT
nginx_conf proxy "upstream up { server 127.0.0.1:$UP_PORT; keepalive 128; }
  server { listen 127.0.0.1:$NGINX_PORT; $nginx_log
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } }
  server { listen 127.0.0.1:$NGINX_FULL_PORT; $nginx_log
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
proxy: { access_log: $tg_access }
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

TOLLGATE_LOG=$tg_log taskset -c "$PROXY_CPU" target/release/tollgate -c "$work/gateway.yaml" 2>"$work/tollgate.log" &
tg_pid=$!
pids+=("$tg_pid")

if [ -n "${BASELINE:-}" ]; then
  sed -e "s/127.0.0.1:$TG_PORT/127.0.0.1:$BASE_PORT/" -e "s/127.0.0.1:$TG_ADMIN/127.0.0.1:$BASE_ADMIN/" \
    "$work/gateway.yaml" >"$work/baseline.yaml"
  TOLLGATE_LOG=$tg_log taskset -c "$PROXY_CPU" "$BASELINE" -c "$work/baseline.yaml" 2>"$work/baseline.log" &
  base_pid=$!
  pids+=("$base_pid")
  wait_http "http://127.0.0.1:$BASE_PORT/"
fi

wait_http "http://127.0.0.1:$UP_PORT/"
wait_http "http://127.0.0.1:$NGINX_PORT/"
wait_http "http://127.0.0.1:$NGINX_FULL_PORT/"
wait_http "http://127.0.0.1:$TG_PORT/"

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
idle_rss=$(rss_kib "$tg_pid")

# to_us "1.23ms" -> microseconds
to_us() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000; else if (v ~ /s$/) print n * 1000000; else print n }'; }

declare -A RPS P50 P99 CPU
# The process whose CPU time a port's runs are charged with: the proxy's
# user and system time per request, what the request cost the proxy itself.
nginx_worker=$(pgrep -P "$(cat "$work/proxy.pid")" | head -1)
declare -A PROXY_PID=([$NGINX_PORT]=$nginx_worker [$NGINX_FULL_PORT]=$nginx_worker [$TG_PORT]=$tg_pid)
[ -n "${BASELINE:-}" ] && PROXY_PID[$BASE_PORT]=$base_pid
clock_ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; } # user + system, all threads
run() { # name port [path [wrk args...]]: one round, appended to the target's figures
  local name=$1 port=$2 path=${3:-/}
  shift 3 2>/dev/null || shift $#
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s "$@" "http://127.0.0.1:$port$path" >/dev/null # warm-up
  local out pid=${PROXY_PID[$port]:-} before=0
  [ -n "$pid" ] && before=$(cpu_ticks "$pid")
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --latency "$@" "http://127.0.0.1:$port$path")
  if [ -n "$pid" ]; then
    CPU[$name]+=" $(awk -v b="$before" -v a="$(cpu_ticks "$pid")" -v hz="$clock_ticks" '/requests in/ { printf "%.3f", (a - b) * 1e6 / hz / $1 }' <<<"$out")"
  fi
  RPS[$name]+=" $(awk '/Requests\/sec/ {print $2}' <<<"$out")"
  P50[$name]+=" $(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")"
  P99[$name]+=" $(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")"
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "$name: errors during the run:"; grep "Non-2xx\|Socket errors" <<<"$out"; fi
}
curl -fs -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$TG_PORT/jwt/" >/dev/null || { echo "the bench token is refused"; exit 1; }

PROXIES="nginx nginx-headers tollgate tollgate-jwt nginx-token"
[ -n "${BASELINE:-}" ] && PROXIES+=" baseline baseline-jwt"
round() { # number, suffix of the target names: one turn of each proxy
  local n=$1 s=$2
  run "nginx$s" $NGINX_PORT
  run "nginx-headers$s" $NGINX_FULL_PORT
  run "tollgate$s" $TG_PORT
  run "tollgate-jwt$s" $TG_PORT /jwt/ -H "Authorization: Bearer $TOKEN"
  run "nginx-token$s" $NGINX_PORT /jwt/ -H "Authorization: Bearer $TOKEN"
  if [ -n "${BASELINE:-}" ]; then
    run "baseline$s" $BASE_PORT
    run "baseline-jwt$s" $BASE_PORT /jwt/ -H "Authorization: Bearer $TOKEN"
  fi
  printf 'round %d requests/s:' "$n"
  [ -z "$s" ] && printf ' direct %s,' "${RPS[direct]##* }"
  for t in $PROXIES; do printf ' %s %s,' "$t" "${RPS[$t$s]##* }"; done
  echo
}
ratio() { # A B suffix: A's median over B's
  awk -v a="$(median "${RPS[$1$3]}")" -v b="$(median "${RPS[$2$3]}")" 'BEGIN { printf "%.2f", a / b }'
}
report() { # suffix, as for round
  local s=$1 t
  printf '\nmedians of %d rounds\n%-20s %12s %10s %10s %18s\n' "$ROUNDS" target "requests/s" "p50 us" "p99 us" "proxy CPU us/req"
  for t in ${2:-} $PROXIES; do
    printf '%-20s %12.0f %10.0f %10.0f %18s\n' "$t$s" "$(median "${RPS[$t$s]}")" "$(median "${P50[$t$s]}")" "$(median "${P99[$t$s]}")" "$(median "${CPU[$t$s]:-}")"
  done
  echo
  echo "throughput (ratio of medians; in brackets the ratio within each round: median (lowest-highest))"
  echo "  tollgate/nginx:         $(ratio tollgate nginx "$s")   [$(per_round "${RPS[tollgate$s]}" "${RPS[nginx$s]}")]"
  echo "  tollgate/nginx-headers: $(ratio tollgate nginx-headers "$s")   [$(per_round "${RPS[tollgate$s]}" "${RPS[nginx-headers$s]}")]"
  echo "  JWT-validated: of tollgate without auth $(ratio tollgate-jwt tollgate "$s") [$(per_round "${RPS[tollgate-jwt$s]}" "${RPS[tollgate$s]}")]," \
    "of nginx $(ratio tollgate-jwt nginx "$s") [$(per_round "${RPS[tollgate-jwt$s]}" "${RPS[nginx$s]}")]," \
    "of nginx-token $(ratio tollgate-jwt nginx-token "$s") [$(per_round "${RPS[tollgate-jwt$s]}" "${RPS[nginx-token$s]}")]"
  echo "  (nginx-token: nginx sent the same requests, token and all, which it passes on unchecked)"
  if [ -n "${BASELINE:-}" ]; then
    echo "  tollgate/baseline: $(ratio tollgate baseline "$s") [$(per_round "${RPS[tollgate$s]}" "${RPS[baseline$s]}")], JWT route $(ratio tollgate-jwt baseline-jwt "$s") [$(per_round "${RPS[tollgate-jwt$s]}" "${RPS[baseline-jwt$s]}")]; CPU per request $(per_round "${CPU[tollgate$s]}" "${CPU[baseline$s]}"), JWT route $(per_round "${CPU[tollgate-jwt$s]}" "${CPU[baseline-jwt$s]}")"
  fi
  echo "proxy CPU per request (user + system), within each round: tollgate/nginx $(per_round "${CPU[tollgate$s]}" "${CPU[nginx$s]}")," \
    "tollgate-jwt/nginx $(per_round "${CPU[tollgate-jwt$s]}" "${CPU[nginx$s]}"), tollgate-jwt/nginx-token $(per_round "${CPU[tollgate-jwt$s]}" "${CPU[nginx-token$s]}")"
}
p99() { median "${P99[$1]}"; }

if [ -z "${ONLY_CAPPED:-}" ]; then # ONLY_CAPPED=1: only the CPU-limited pass
for r in $(seq "$ROUNDS"); do
  run direct $UP_PORT
  round "$r" ""
done
report "" direct
awk -v t="$(p99 tollgate)" -v n="$(p99 nginx)" -v h="$(p99 nginx-headers)" -v d="$(p99 direct)" \
  'BEGIN { printf "added p99 (us): tollgate %.0f, nginx %.0f, nginx-headers %.0f\n", t - d, n - d, h - d }'

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
fi # ONLY_CAPPED

# The same proxies under a CPU limit of CAP% of a core, as sidecars are
# usually run: the proxy is then what limits throughput, not the core that
# load generator and upstream share, and requests/s measure what a request
# costs the proxy.
[ "$CAP" = 0 ] && exit 0
nginx_master=$(cat "$work/proxy.pid")
# shellcheck disable=SC2046 # one pid per word
if ! cpu_limit nginx "$CAP" "$nginx_master" $(pgrep -P "$nginx_master") || ! cpu_limit tollgate "$CAP" "$tg_pid" ||
  { [ -n "${BASELINE:-}" ] && ! cpu_limit baseline "$CAP" "$base_pid"; }; then
  echo "no runs under a CPU limit: no cgroup with a CPU quota could be made (needs root and the cpu controller); CAP=0 skips them"
  exit 0
fi
printf '\nunder a CPU limit of %d%% of a core (CFS quota, 100 ms period)\n' "$CAP"
for r in $(seq "$ROUNDS"); do round "$r" "@$CAP%"; done
report "@$CAP%"
