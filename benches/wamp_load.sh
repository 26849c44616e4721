#!/usr/bin/env bash
# WAMP load comparison in one run: tollgate's router and Crossbar (PyPI, in a
# venv made on first use), each pinned to the same core, the load tool
# (benches/wamp_load.rs) on the other. Both with one realm, anonymous
# sessions allowed everything under `com.bench.` (tollgate through its
# policy engine, Crossbar through its static role permissions), RawSocket
# and WebSocket on one port, JSON and MessagePack. The routers take turns
# for ROUNDS rounds; each figure is the median of its rounds.
#
#   benches/wamp_load.sh                  # needs: taskset, python3-venv (for Crossbar); ~10 min
#   SECS=10 ROUNDS=5 IDLE_SESSIONS=1000 benches/wamp_load.sh
#   ONLY=tollgate benches/wamp_load.sh    # without Crossbar
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
ROUTER_CPU=${ROUTER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
IDLE_SESSIONS=${IDLE_SESSIONS:-1000}
IDLE_TRANSPORT=${IDLE_TRANSPORT:-websocket}
# RPC: CALLERS sessions, each with WINDOW calls outstanding, one callee.
CALLERS=${CALLERS:-10}
WINDOW=${WINDOW:-32}
# Fan-out latency under a load both routers carry: publications/s to the
# 100 subscribers (x100 events/s).
FANOUT_RATE=${FANOUT_RATE:-100}
# Each run first waits (up to 30 s) for both cores to be nearly idle: other
# work on the machine (a build, a test suite) moves figures by 2x. QUIET=0
# skips the wait.
QUIET=${QUIET:-1}
ONLY=${ONLY:-}
CROSSBAR_VENV=${CROSSBAR_VENV:-$HOME/.cache/tollgate-bench/crossbar-venv}
# A pip version specifier (`==26.10.1`); the newest when empty.
CROSSBAR_VERSION=${CROSSBAR_VERSION:-}
TG_PORT=18080 CB_PORT=18081 TG_ADMIN=19095

source benches/common.sh
require taskset curl

cargo build --release --quiet
cargo bench --bench wamp_load --no-run --quiet 2>/dev/null
tool=$(ls -t target/release/deps/wamp_load-* | grep -v '\.d$' | head -1)

targets=(tollgate)
crossbar=$CROSSBAR_VENV/bin/crossbar
install_crossbar() {
  # The system Python (python3 may be a pyenv shim without venv support).
  local py=${PYTHON:-/usr/bin/python3}
  [ -x "$py" ] || py=$(command -v python3)
  if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "$py cannot make a venv: apt-get install python3-venv (or set PYTHON=)" >&2
    return 1
  fi
  echo "installing crossbar$CROSSBAR_VERSION into $CROSSBAR_VENV (once)" >&2
  "$py" -m venv "$CROSSBAR_VENV" || return 1
  "$CROSSBAR_VENV/bin/pip" install -q --upgrade pip || return 1
  # numpy<2: bjdata (Crossbar's UBJSON codec) is built against NumPy 1.x;
  # under NumPy 2 every router worker prints an import traceback at start.
  "$CROSSBAR_VENV/bin/pip" install -q "crossbar$CROSSBAR_VERSION" 'numpy<2' || {
    echo "pip could not install crossbar$CROSSBAR_VERSION (see above)" >&2
    return 1
  }
}
if [ "$ONLY" != tollgate ]; then
  if [ -x "$crossbar" ] || install_crossbar; then
    targets+=(crossbar)
  else
    echo "no Crossbar: measuring tollgate alone" >&2
  fi
fi

cat > "$work/gateway.yaml" <<CONF
listeners:
  - { name: sidecar, bind: 127.0.0.1:0 }
  - { name: wamp, bind: 127.0.0.1:$TG_PORT, protocol: wamp }
admin: { bind: 127.0.0.1:$TG_ADMIN }
runtime: { workers: 1 }
wamp:
  auth: { anonymous: { role: anonymous } }
  realms:
    - name: realm1
      roles:
        - name: anonymous
          permissions:
            - allow: { uris: ['com.bench.**'] }
CONF
# Crossbar's node: one router worker, the same realm and role, one
# "universal" transport (RawSocket and WebSocket at /ws on one port).
mkdir "$work/.crossbar"
cat > "$work/.crossbar/config.json" <<CONF
{
  "version": 2,
  "controller": {},
  "workers": [
    {
      "type": "router",
      "realms": [
        {
          "name": "realm1",
          "roles": [
            {
              "name": "anonymous",
              "permissions": [
                {
                  "uri": "com.bench.",
                  "match": "prefix",
                  "allow": { "call": true, "register": true, "publish": true, "subscribe": true },
                  "disclose": { "caller": false, "publisher": false },
                  "cache": true
                }
              ]
            }
          ]
        }
      ],
      "transports": [
        {
          "type": "universal",
          "endpoint": { "type": "tcp", "interface": "127.0.0.1", "port": $CB_PORT, "backlog": 4096 },
          "rawsocket": { "serializers": ["msgpack", "json"] },
          "websocket": { "ws": { "type": "websocket", "serializers": ["msgpack", "json"] } }
        }
      ]
    }
  ]
}
CONF

wait_port() { # port: until it takes connections (60 s at most)
  for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "not up: port $1"
  exit 1
}

declare -A router_pid
TOLLGATE_LOG=warn taskset -c "$ROUTER_CPU" target/release/tollgate run -c "$work/gateway.yaml" 2>"$work/tollgate.log" &
router_pid[tollgate]=$!
pids+=("$!")
if [[ " ${targets[*]} " == *" crossbar "* ]]; then
  # The controller, and its router worker (a child) inherit the pinning.
  (cd "$work" && exec taskset -c "$ROUTER_CPU" "$crossbar" start --cbdir "$work/.crossbar" --loglevel warn) \
    >"$work/crossbar.log" 2>&1 &
  cb_controller=$!
  pids+=("$cb_controller")
fi
wait_http "http://127.0.0.1:$TG_ADMIN/healthz"
wait_port "$TG_PORT"
if [ -n "${cb_controller:-}" ]; then
  wait_port "$CB_PORT"
  router_pid[crossbar]=$(pgrep -P "$cb_controller" | head -1)
  [ -n "${router_pid[crossbar]}" ] || { echo "no Crossbar router worker"; cat "$work/crossbar.log"; exit 1; }
fi

port_of() { if [ "$1" = crossbar ]; then echo "$CB_PORT"; else echo "$TG_PORT"; fi; }
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
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

# The idle sessions first, on fresh routers.
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
idle_rss() { # port pid -> RSS before and with the sessions (KiB)
  local port=$1 pid=$2 before after
  before=$(rss_kib "$pid")
  coproc IDLE { env TARGET="127.0.0.1:$port" SCENARIO=idle CONNS="$IDLE_SESSIONS" TRANSPORT="$IDLE_TRANSPORT" taskset -c "$LOAD_CPU" "$tool"; }
  read -r _ <&"${IDLE[0]}"
  sleep 2
  after=$(rss_kib "$pid")
  exec {IDLE[1]}>&-
  wait "$IDLE_PID" 2>/dev/null || true
  echo "$before $after"
}
declare -A rss
for target in "${targets[@]}"; do
  rss[$target]=$(idle_rss "$(port_of "$target")" "${router_pid[$target]}")
done

load() { # port scenario env... -> the tool's line
  local port=$1 scenario=$2
  shift 2
  env TARGET="127.0.0.1:$port" SCENARIO="$scenario" SECS="$SECS" "$@" \
    timeout $((SECS + 120)) taskset -c "$LOAD_CPU" "$tool" || true
}

declare -A results
rows=()
problems=()
run() { # label scenario env... : one run per router, alternating
  local label=$1 scenario=$2 rate_field=calls_per_s
  shift 2
  [ "$scenario" = fanout ] && rate_field=events_per_s
  [[ " ${rows[*]:-} " == *" $label "* ]] || rows+=("$label")
  for target in "${targets[@]}"; do
    wait_quiet
    local pid=${router_pid[$target]} t0 line cpu
    t0=$(ticks "$pid")
    line=$(load "$(port_of "$target")" "$scenario" "$@")
    cpu=$(( ($(ticks "$pid") - t0) * 100 / ($(getconf CLK_TCK) * (SECS + 1)) ))
    echo "  $target: ${line:-failed} (router CPU ~${cpu}%)" >&2
    [ -n "$line" ] || problems+=("$label, $target: the tool failed")
    for f in drops closed errors; do
      local n
      n=$(field "$f" <<<"$line")
      [ "${n:-0}" = 0 ] || problems+=("$label, $target: $f=$n")
    done
    results[$label/rate/$target]="${results[$label/rate/$target]:-} $(field "$rate_field" <<<"$line")"
    results[$label/p50/$target]="${results[$label/p50/$target]:-} $(field p50_us <<<"$line")"
    results[$label/p99/$target]="${results[$label/p99/$target]:-} $(field p99_us <<<"$line")"
  done
}

rpc="$CALLERS callers x $WINDOW"
for round in $(seq "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  for tr in rawsocket websocket; do
    run "RPC $tr msgpack, $rpc (calls/s)" rpc TRANSPORT=$tr CALLERS="$CALLERS" WINDOW="$WINDOW"
  done
  run "RPC websocket json, $rpc (calls/s)" rpc TRANSPORT=websocket SERIALIZER=json CALLERS="$CALLERS" WINDOW="$WINDOW"
  for tr in rawsocket websocket; do
    run "RPC $tr msgpack, 1 call at a time (calls/s)" rpc TRANSPORT=$tr CALLERS=1 WINDOW=1
  done
  for tr in rawsocket websocket; do
    run "fan-out $tr msgpack, 100 subs (events/s)" fanout TRANSPORT=$tr
  done
  run "fan-out websocket json, 100 subs (events/s)" fanout TRANSPORT=websocket SERIALIZER=json
  for tr in rawsocket websocket; do
    run "fan-out $tr msgpack at $FANOUT_RATE pub/s (events/s)" fanout TRANSPORT=$tr RATE="$FANOUT_RATE"
  done
done

has_cb=0
[[ " ${targets[*]} " == *" crossbar "* ]] && has_cb=1
echo
printf '%-50s %22s %22s %6s  %s\n' "" "tollgate: rate p50/p99" "crossbar: rate p50/p99" ratio "target (>= 10x rate, lower p99)"
for label in "${rows[@]}"; do
  tg=$(median "${results[$label/rate/tollgate]}")
  tg_lat="$(median "${results[$label/p50/tollgate]}")/$(median "${results[$label/p99/tollgate]}")"
  if [ $has_cb = 1 ]; then
    cb=$(median "${results[$label/rate/crossbar]}")
    cb_lat="$(median "${results[$label/p50/crossbar]}")/$(median "${results[$label/p99/crossbar]}")"
    ratio=$(awk -v a="$tg" -v b="$cb" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    tg99=$(median "${results[$label/p99/tollgate]}")
    cb99=$(median "${results[$label/p99/crossbar]}")
    lower=$(awk -v a="$tg99" -v b="$cb99" 'BEGIN { print (a < b) ? "lower p99" : "p99 not lower" }')
    case $label in
      *"at a time"* | *" pub/s "*) verdict="$lower (latency line)" ;;
      *) verdict=$(awk -v r="$ratio" 'BEGIN { print (r >= 10) ? "rate met" : "rate not met" }')", $lower, per round $(per_round "${results[$label/rate/tollgate]}" "${results[$label/rate/crossbar]}" 2>/dev/null || echo -)" ;;
    esac
  else
    cb="-" cb_lat="-" ratio="-" verdict=""
  fi
  printf '%-50s %10s %11s %10s %11s %6s  %s\n' "$label" "$tg" "$tg_lat" "$cb" "$cb_lat" "$ratio" "$verdict"
done
echo "(p50/p99 in microseconds, from CALL to RESULT or PUBLISH to EVENT)"
for target in "${targets[@]}"; do
  read -r before after <<<"${rss[$target]}"
  printf '%-9s RSS idle %6d KiB, with %d %s sessions %7d KiB: %.1f KiB per session\n' "$target" "$before" \
    "$IDLE_SESSIONS" "$IDLE_TRANSPORT" "$after" "$(awk -v a="$before" -v b="$after" -v n="$IDLE_SESSIONS" 'BEGIN { print (b - a) / n }')"
done
[ $has_cb = 1 ] && echo "(Crossbar: its router worker; the controller process is not counted)"
if [ ${#problems[@]} -gt 0 ]; then
  echo "problems:"
  printf '  %s\n' "${problems[@]}"
fi
