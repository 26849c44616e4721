#!/usr/bin/env bash
# WebSocket tunnel relay comparison in one run: tollgate's relay (`tunnels:`
# on an mTLS listener) and a Micronets-style Python relay
# (benches/tunnel_relay.py, the `websockets` library on asyncio), each
# pinned to the same core, the load tool (benches/tunnel_load.rs) on the
# other. Same certificates for both (`tollgate pki`: a CA, the server's,
# two clients': the two peers of an id present different ones), client
# certificates required by both. The relays take turns for ROUNDS rounds;
# each figure is the median of its rounds.
#
#   benches/tunnel_load.sh                 # needs: taskset, curl, python3-websockets (or python3-venv); ~5 min
#   SECS=10 ROUNDS=5 IDLE_IDS=500 benches/tunnel_load.sh
#   ONLY=tollgate benches/tunnel_load.sh   # without the Python relay
#
# Last, HTTP over the tunnel (tollgate only): requests to a gateway route
# `upstream: { tunnel: bench-http }`, carried to a `tollgate tunnel connect`
# peer in front of a small HTTP server (the load tool's `upstream`).
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
RELAY_CPU=${RELAY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
# Relay throughput: PAIRS pairs, one sender each with WINDOW messages of
# SIZE bytes on the way at most.
PAIRS=${PAIRS:-10}
WINDOW=${WINDOW:-64}
SIZE=${SIZE:-1024}
# Idle peers: two on each of IDLE_IDS ids.
IDLE_IDS=${IDLE_IDS:-500}
HTTP_CONNS=${HTTP_CONNS:-16}
# Each run first waits (up to 30 s) for both cores to be nearly idle; QUIET=0
# skips the wait.
QUIET=${QUIET:-1}
ONLY=${ONLY:-}
# The Python with `websockets`: the system's (Debian python3-websockets),
# else a venv made on first use with the newest from PyPI.
PYTHON=${PYTHON:-/usr/bin/python3}
WEBSOCKETS_VENV=${WEBSOCKETS_VENV:-$HOME/.cache/tollgate-bench/websockets-venv}
TG_PORT=18543 PY_PORT=18544 TG_HTTP=18545 UP_PORT=18546 TG_ADMIN=19195

source benches/common.sh
require taskset curl

cargo build --release --quiet
cargo bench --bench tunnel_load --no-run --quiet 2>/dev/null
tool=$(ls -t target/release/deps/tunnel_load-* | grep -v '\.d$' | head -1)
tg=target/release/tollgate

$tg pki init-ca --org Bench --cn "Bench Root" --out "$work/ca" >/dev/null
$tg pki issue --ca "$work/ca" --kind server --cn localhost --san localhost --san 127.0.0.1 --out "$work/server" >/dev/null
$tg pki issue --ca "$work/ca" --kind client --cn peer-a --org bench --out "$work/peer-a" >/dev/null
$tg pki issue --ca "$work/ca" --kind client --cn peer-b --org bench --out "$work/peer-b" >/dev/null
export CA=$work/ca/ca.pem CERT=$work/peer-a.pem KEY=$work/peer-a.key CERT2=$work/peer-b.pem KEY2=$work/peer-b.key

cat > "$work/gateway.yaml" <<CONF
listeners:
  - name: edge
    bind: 127.0.0.1:$TG_PORT
    protocol: https
    tls: { cert: server.pem, key: server.key, client_ca: ca/ca.pem, client_auth: required }
  - name: sidecar
    bind: 127.0.0.1:$TG_HTTP
    protocol: http
admin: { bind: 127.0.0.1:$TG_ADMIN }
proxy: { access_log: false }
reload: { watch: false }
tunnels:
  - prefix: /micronets/v1/ws-proxy/
    max_peers: 2
routes:
  - name: bench-http
    match: { path_prefix: /svc/ }
    strip_prefix: true
    upstream: { tunnel: bench-http, timeout: 10s }
runtime: { workers: 1 }
CONF

targets=()
if $tg check-config -c "$work/gateway.yaml" >"$work/check.log" 2>&1; then
  targets+=(tollgate)
else
  echo "this tollgate build has no tunnel relay (check-config: $(grep -m1 -i error "$work/check.log" || head -1 "$work/check.log")): measuring the Python relay alone" >&2
fi
install_websockets() {
  local py=$PYTHON
  [ -x "$py" ] || py=$(command -v python3)
  if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "$py has no websockets and cannot make a venv: apt-get install python3-websockets (or python3-venv)" >&2
    return 1
  fi
  echo "installing websockets into $WEBSOCKETS_VENV (once)" >&2
  "$py" -m venv "$WEBSOCKETS_VENV" && "$WEBSOCKETS_VENV/bin/pip" install -q websockets || {
    echo "pip could not install websockets (see above)" >&2
    return 1
  }
}
if [ "$ONLY" != tollgate ]; then
  if "$PYTHON" -c 'import websockets' 2>/dev/null; then
    py=$PYTHON
  elif [ -x "$WEBSOCKETS_VENV/bin/python" ] || install_websockets; then
    py=$WEBSOCKETS_VENV/bin/python
  fi
  if [ -n "${py:-}" ]; then
    targets+=(python)
    py_version=$("$py" -c 'import sys, websockets; print("Python %d.%d.%d, websockets %s" % (sys.version_info[:3] + (websockets.__version__,)))')
  else
    echo "no Python relay" >&2
  fi
fi
[ ${#targets[@]} -gt 0 ] || { echo "nothing to measure"; exit 1; }

wait_port() { # port: until it takes connections (30 s at most)
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "not up: port $1"
  exit 1
}

declare -A relay_pid
if [[ " ${targets[*]} " == *" tollgate "* ]]; then
  TOLLGATE_LOG=warn taskset -c "$RELAY_CPU" $tg run -c "$work/gateway.yaml" 2>"$work/tollgate.log" &
  relay_pid[tollgate]=$!
  pids+=("$!")
  wait_http "http://127.0.0.1:$TG_ADMIN/healthz"
  wait_port "$TG_PORT"
fi
if [[ " ${targets[*]} " == *" python "* ]]; then
  taskset -c "$RELAY_CPU" "$py" benches/tunnel_relay.py --port "$PY_PORT" \
    --cert "$work/server.pem" --key "$work/server.key" --ca "$CA" 2>"$work/python.log" &
  relay_pid[python]=$!
  pids+=("$!")
  wait_port "$PY_PORT"
fi

port_of() { if [ "$1" = python ]; then echo "$PY_PORT"; else echo "$TG_PORT"; fi; }
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
busy_pct() { # both cores over half a second
  local a b
  a=($(head -1 /proc/stat))
  sleep 0.5
  b=($(head -1 /proc/stat))
  awk -v u="$(( b[1] + b[2] + b[3] + b[6] + b[7] + b[8] - a[1] - a[2] - a[3] - a[6] - a[7] - a[8] ))" \
    -v i="$(( b[4] + b[5] - a[4] - a[5] ))" 'BEGIN { printf "%d", 100 * u / (u + i + 0.001) }'
}
wait_quiet() {
  [ "$QUIET" = 1 ] || return 0
  for _ in $(seq 60); do [ "$(busy_pct)" -lt 10 ] && return 0; done
  echo "    (the machine stayed busy with other work; measuring anyway)" >&2
}
problems=()

# Idle peers first, on fresh relays: RSS before, with them, and 2 s after
# they closed. They close in two steps: the first peer of every id (a
# WebSocket close from the client), then the second; the tool reports how
# each connection ended: cleanly, or without TLS's close_notify
# (truncated_ends), or with an error.
declare -A rss idle_end
idle_rss() { # target: rss[target]="before with after"
  local port pid before with after line
  port=$(port_of "$1") pid=${relay_pid[$1]}
  before=$(rss_kib "$pid")
  coproc IDLE { env TARGET="127.0.0.1:$port" SCENARIO=idle IDS="$IDLE_IDS" taskset -c "$LOAD_CPU" "$tool" 2>>"$work/tool.log"; }
  read -r line <&"${IDLE[0]}" || true
  if [ "${line%% *}" != ready ]; then
    problems+=("idle peers, $1: the tool did not get its peers up: $(tail -1 "$work/tool.log")")
    wait "$IDLE_PID" 2>/dev/null || true
    rss[$1]="$before - -"
    return
  fi
  sleep 2
  with=$(rss_kib "$pid")
  exec {IDLE[1]}>&-
  read -r line <&"${IDLE[0]}" || true
  wait "$IDLE_PID" 2>/dev/null || true
  idle_end[$1]=$line
  if [ -z "$line" ]; then
    problems+=("idle peers, $1: the tool failed: $(tail -1 "$work/tool.log")")
  else
    local f
    for f in closed truncated_ends error_ends open; do
      [ "$(field $f <<<" $line")" = 0 ] || problems+=("idle peers, $1: $f=$(field $f <<<" $line") ($line)")
    done
  fi
  sleep 2
  after=$(rss_kib "$pid")
  rss[$1]="$before $with $after"
}
for target in "${targets[@]}"; do
  wait_quiet
  idle_rss "$target"
  echo "  $target idle RSS (KiB) before/with/after $((2 * IDLE_IDS)) peers: ${rss[$target]}" >&2
done

declare -A results
rows=()
run() { # label scenario rate-field env... : one run per relay, alternating
  local label=$1 scenario=$2 rate_field=$3
  shift 3
  [[ " ${rows[*]:-} " == *" $label "* ]] || rows+=("$label")
  for target in "${targets[@]}"; do
    wait_quiet
    local pid=${relay_pid[$target]} t0 w0 line cpu
    t0=$(ticks "$pid") w0=$(date +%s%N)
    local addr=127.0.0.1:$(port_of "$target")
    [ "$scenario" = http ] && addr=127.0.0.1:${http_port[$target]}
    line=$(env TARGET="$addr" SCENARIO="$scenario" SECS="$SECS" SIZE="$SIZE" "$@" \
      timeout $((SECS + 60)) taskset -c "$LOAD_CPU" "$tool" 2>>"$work/tool.log" || true)
    # The relay's CPU over the whole run (joining, warm-up, the measured
    # window), % of its core.
    cpu=$(( ($(ticks "$pid") - t0) * 100 * 1000000000 / ($(getconf CLK_TCK) * ($(date +%s%N) - w0)) ))
    echo "  $target: ${line:-failed: $(tail -1 "$work/tool.log")} (relay CPU ~${cpu}%)" >&2
    [ -n "$line" ] || problems+=("$label, $target: the tool failed: $(tail -1 "$work/tool.log")")
    for f in drops closed errors; do
      local n
      n=$(field "$f" <<<"$line")
      [ "${n:-0}" = 0 ] || problems+=("$label, $target: $f=$n")
    done
    results[$label/rate/$target]="${results[$label/rate/$target]:-} $(field "$rate_field" <<<"$line")"
    results[$label/p50/$target]="${results[$label/p50/$target]:-} $(field p50_us <<<"$line")"
    results[$label/p99/$target]="${results[$label/p99/$target]:-} $(field p99_us <<<"$line")"
    results[$label/cpu/$target]="${results[$label/cpu/$target]:-} $cpu"
  done
}

for round in $(seq "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  run "relay, $PAIRS pairs x $WINDOW (msgs/s)" relay msgs_per_s PAIRS="$PAIRS" WINDOW="$WINDOW"
  run "ping-pong, 1 pair (round trips/s)" pingpong rtt_per_s
done

# HTTP over the tunnel, last. The service: the load tool's `upstream` (200
# `ok`), behind a `tollgate tunnel connect --forward-to` peer, all on the
# load core with the tool.
# - via the gateway: requests to tollgate's route `upstream: { tunnel:
#   bench-http }`, which carries them as REST:REQUEST messages to the peer
#   (tollgate only: the Python relay has no HTTP side);
# - peer to peer: requests to a second peer, `tollgate tunnel connect
#   --serve-http` (what the seed's test client does), which carries them
#   through the relay (either) to the `--forward-to` peer on the same id.
http_note=""
http_up() { # port: until it answers 200 (10 s at most)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$1/svc/bench" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}
declare -A http_port
if [[ " ${targets[*]} " == *" tollgate "* ]] && ! $tg tunnel connect --help >/dev/null 2>&1; then
  http_note="HTTP over the tunnel: skipped, this build has no \`tollgate tunnel connect\`"
elif $tg tunnel connect --help >/dev/null 2>&1; then
  taskset -c "$LOAD_CPU" env TARGET="127.0.0.1:$UP_PORT" SCENARIO=upstream "$tool" >"$work/upstream.log" 2>&1 &
  pids+=("$!")
  wait_port "$UP_PORT"
  peer() { # log relay-port id cert key mode-args...
    local log=$1 port=$2 id=$3 cert=$4 key=$5
    shift 5
    TOLLGATE_LOG=warn taskset -c "$LOAD_CPU" $tg tunnel connect "wss://127.0.0.1:$port/micronets/v1/ws-proxy/$id" \
      --cert "$cert" --key "$key" --ca "$CA" "$@" 2>"$work/$log.log" &
    pids+=("$!")
  }
  p2p_targets=()
  for target in "${targets[@]}"; do
    port=$(port_of "$target")
    if [ "$target" = tollgate ]; then
      peer gateway-peer "$port" bench-http "$CERT" "$KEY" --forward-to "http://127.0.0.1:$UP_PORT"
    fi
    http_port[$target]=$((port + 10))
    peer "$target-forward" "$port" bench-p2p "$CERT2" "$KEY2" --forward-to "http://127.0.0.1:$UP_PORT"
    sleep 0.5
    peer "$target-serve" "$port" bench-p2p "$CERT" "$KEY" --serve-http "127.0.0.1:${http_port[$target]}"
    if http_up "${http_port[$target]}"; then
      p2p_targets+=("$target")
    else
      problems+=("HTTP peer to peer, $target: no 200 through the two peers ($(tail -1 "$work/$target-serve.log"))")
    fi
  done
  saved=("${targets[@]}")
  for round in $(seq "$ROUNDS"); do
    echo "HTTP round $round of $ROUNDS" >&2
    if [[ " ${saved[*]} " == *" tollgate "* ]] && http_up "$TG_HTTP"; then
      targets=(tollgate)
      http_port[tollgate]=$TG_HTTP
      run "HTTP via the gateway, $HTTP_CONNS conns (req/s)" http requests_per_s CONNS="$HTTP_CONNS"
    elif [[ " ${saved[*]} " == *" tollgate "* ]]; then
      http_note="HTTP via the gateway: skipped, the route never answered 200 ($(tail -1 "$work/gateway-peer.log"))"
    fi
    targets=("${p2p_targets[@]}")
    for target in "${targets[@]}"; do http_port[$target]=$(( $(port_of "$target") + 10 )); done
    [ ${#targets[@]} -gt 0 ] && run "HTTP peer to peer, $HTTP_CONNS conns (req/s)" http requests_per_s CONNS="$HTTP_CONNS"
    targets=("${saved[@]}")
  done
fi

declare -A rss_end
for target in "${targets[@]}"; do rss_end[$target]=$(rss_kib "${relay_pid[$target]}"); done

has() { [[ " ${targets[*]} " == *" $1 "* ]]; }
echo
printf '%-44s %24s %24s %7s\n' "" "tollgate: rate p50/p99" "python: rate p50/p99" ratio
for label in "${rows[@]}"; do
  line=$(printf '%-44s' "$label")
  for target in tollgate python; do
    if has "$target" && [ -n "${results[$label/rate/$target]:-}" ]; then
      line+=$(printf ' %10s %13s' "$(median "${results[$label/rate/$target]}")" \
        "$(median "${results[$label/p50/$target]}")/$(median "${results[$label/p99/$target]}")")
    else
      line+=$(printf ' %24s' -)
    fi
  done
  if has tollgate && has python && [ -n "${results[$label/rate/python]:-}" ]; then
    line+=$(printf ' %7s  per round %s' \
      "$(awk -v a="$(median "${results[$label/rate/tollgate]}")" -v b="$(median "${results[$label/rate/python]}")" \
        'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')" \
      "$(per_round "${results[$label/rate/tollgate]}" "${results[$label/rate/python]}" 2>/dev/null || echo -)")
  fi
  echo "$line"
done
echo "(p50/p99 in microseconds: relay send to arrival, ping-pong and HTTP the round trip)"
echo "relay CPU (% of its core over the runs, and per message, round trip or request):"
for label in "${rows[@]}"; do
  line="  ${label% (*}:"
  for target in "${targets[@]}"; do
    if [ -n "${results[$label/cpu/$target]:-}" ]; then
      cpu=$(median "${results[$label/cpu/$target]}")
      line+=" $target ~$cpu% ($(awk -v c="$cpu" -v r="$(median "${results[$label/rate/$target]}")" \
        'BEGIN { if (r > 0) printf "%.1f", c * 10000 / r; else print "-" }') us)"
    fi
  done
  echo "$line"
done
for target in "${targets[@]}"; do
  read -r before with after <<<"${rss[$target]}"
  printf '%-9s RSS idle %6s KiB, with %d idle peers %7s KiB (%s KiB per peer), 2 s after they left %7s KiB, after all runs %7s KiB\n' \
    "$target" "$before" "$((2 * IDLE_IDS))" "$with" \
    "$(awk -v a="$before" -v b="$with" -v n="$((2 * IDLE_IDS))" 'BEGIN { if (b == "-") print "-"; else printf "%.1f", (b - a) / n }')" \
    "$after" "${rss_end[$target]}"
done
for target in "${targets[@]}"; do
  echo "$target idle peers' ends: $(sed 's/.*\(clean_ends=.*\)/\1/' <<<"${idle_end[$target]:-}")"
done
[ -n "${py_version:-}" ] && has python && echo "python relay: $py_version"
[ -n "$http_note" ] && echo "$http_note"
if has tollgate; then
  n=$(grep -c . "$work/tollgate.log" || true)
  if [ "$n" -gt 0 ]; then
    problems+=("tollgate logged $n lines at warn or above; the first: $(grep -m3 . "$work/tollgate.log" | tr '\n' ' ')")
  fi
fi
if [ ${#problems[@]} -gt 0 ]; then
  echo "problems:"
  printf '  %s\n' "${problems[@]}"
fi
