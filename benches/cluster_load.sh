#!/usr/bin/env bash
# Cluster mode against one node, in one run: three tollgate nodes (a
# `--features cluster` build) on one etcd and one NATS server, all pinned to
# one core, the load tools (benches/mqtt_load.rs, benches/wamp_load.rs) on
# the other. MQTT with the publisher on node A and the subscribers on node B
# (cross-node, over NATS) against everyone on node A (one node's figure, the
# bus idle for it); WAMP calls likewise, the callee on node A and the callers
# on node B against both on node A; and the time for a route registered
# through node B's admin API to be served by all three nodes. Medians of
# ROUNDS rounds.
#
#   benches/cluster_load.sh              # needs: etcd, nats-server, taskset, python3
#   SECS=10 ROUNDS=5 CHANGES=50 benches/cluster_load.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
CHANGES=${CHANGES:-20}
SERVER_CPU=${SERVER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
ETCD_PORT=12379 ETCD_PEER=12380 NATS_PORT=14222
MQTT_PORTS=(18891 18892 18893) HTTP_PORTS=(18081 18082 18083) ADMIN_PORTS=(19101 19102 19103)
WAMP_PORTS=(18281 18282 18283)

source benches/common.sh
require etcd nats-server taskset python3 curl

# The same features for both: a bench build also makes target/release/tollgate.
cargo bench --features cluster --bench mqtt_load --bench wamp_load --no-run --quiet 2>/dev/null
cargo build --release --quiet --features cluster
target=${CARGO_TARGET_DIR:-target}
tool=$(ls -t "$target"/release/deps/mqtt_load-* | grep -v '\.d$' | head -1)
wamp_tool=$(ls -t "$target"/release/deps/wamp_load-* | grep -v '\.d$' | head -1)

taskset -c "$SERVER_CPU" etcd --name bench --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster "bench=http://127.0.0.1:$ETCD_PEER" >"$work/etcd.log" 2>&1 &
pids+=($!)
taskset -c "$SERVER_CPU" nats-server -a 127.0.0.1 -p "$NATS_PORT" >"$work/nats.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$ETCD_PORT/health"

for i in 0 1 2; do
  mkdir -p "$work/node$i"
  cat > "$work/node$i/gateway.yaml" <<CONF
listeners:
  - { name: sidecar, bind: 127.0.0.1:${HTTP_PORTS[$i]} }
  - { name: mqtt, bind: 127.0.0.1:${MQTT_PORTS[$i]}, protocol: mqtt }
  - { name: wamp, bind: 127.0.0.1:${WAMP_PORTS[$i]}, protocol: wamp }
admin: { bind: 127.0.0.1:${ADMIN_PORTS[$i]} }
runtime: { workers: 1 }
proxy: { access_log: false }
routes: []
reload: { allow_no_routes: true }
store: { etcd: { endpoints: [http://127.0.0.1:$ETCD_PORT], prefix: /bench/ } }
bus: { nats: { servers: [nats://127.0.0.1:$NATS_PORT], prefix: bench } }
mqtt:
  auth: { anonymous: true }
  policy: [ { allow: { actions: [publish, subscribe], topics: ["#"] } } ]
  persistence: { enabled: false }
  limits: { max_inflight: 1000 }
  sys_interval: 0s
# The same realm on every node (each authorizes its own sessions).
wamp:
  auth: { anonymous: { role: anonymous } }
  realms:
    - name: realm1
      roles:
        - name: anonymous
          permissions:
            - allow: { uris: ['com.bench.**'] }
CONF
  TOLLGATE_LOG=warn taskset -c "$SERVER_CPU" "$target"/release/tollgate run -c "$work/node$i/gateway.yaml" 2>"$work/node$i.log" &
  pids+=($!)
done
for i in 0 1 2; do wait_http "http://127.0.0.1:${ADMIN_PORTS[$i]}/healthz"; done

load() { # pub-port sub-port scenario env... -> the tool's line
  local pub=$1 sub=$2 scenario=$3
  shift 3
  env TARGET="127.0.0.1:$pub" SUB_TARGET="127.0.0.1:$sub" SCENARIO="$scenario" SECS="$SECS" "$@" \
    taskset -c "$LOAD_CPU" "$tool"
}

declare -A results
run() { # name scenario field env...
  local name=$1 scenario=$2 key=$3
  shift 3
  local v
  v=$(load "${MQTT_PORTS[0]}" "${MQTT_PORTS[0]}" "$scenario" "$@" | field "$key")
  results[$name/one]="${results[$name/one]:-} $v"
  v=$(load "${MQTT_PORTS[0]}" "${MQTT_PORTS[1]}" "$scenario" "$@" | field "$key")
  results[$name/cross]="${results[$name/cross]:-} $v"
}

# WAMP calls (RawSocket, MessagePack): the callee on node A, the callers on
# node A (one) or node B (cross: each call and its result cross NATS).
problems=()
wamp_run() { # name env...
  local name=$1 where line
  shift
  for where in one cross; do
    local caller=${WAMP_PORTS[0]}
    [ "$where" = cross ] && caller=${WAMP_PORTS[1]}
    line=$(env TARGET="127.0.0.1:$caller" CALLEE_TARGET="127.0.0.1:${WAMP_PORTS[0]}" SCENARIO=rpc SECS="$SECS" "$@" \
      timeout $((SECS + 60)) taskset -c "$LOAD_CPU" "$wamp_tool" || true)
    [ -n "$line" ] || problems+=("WAMP $name, $where: the tool failed")
    for f in errors closed; do
      [ "$(field "$f" <<<"$line")" = 0 ] || [ -z "$line" ] || problems+=("WAMP $name, $where: $f=$(field "$f" <<<"$line")")
    done
    for f in calls_per_s p50_us p99_us; do
      results[$name $f/$where]="${results[$name $f/$where]:-} $(field "$f" <<<"$line")"
    done
  done
}

# A route registered on node B, until nodes A, B and C all serve it: the
# milliseconds, one line per change (registered, then removed, CHANGES times).
propagation() {
  python3 - "$CHANGES" "${ADMIN_PORTS[1]}" "${HTTP_PORTS[@]}" "$ETCD_PORT" <<'PY'
import json, sys, time, urllib.request, urllib.error
changes, admin, ports, etcd = int(sys.argv[1]), sys.argv[2], sys.argv[3:6], sys.argv[6]
def status(url):
    try:
        return urllib.request.urlopen(url, timeout=2).status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return 0
def call(method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()
# The upstream is etcd's own /health: something that answers 200.
route = {"name": "probe", "match": {"path_prefix": "/health"},
         "upstream": {"targets": [f"http://127.0.0.1:{etcd}"]}}
for _ in range(changes):
    for want, act in ((200, lambda: call("POST", "/admin/routes", route)),
                      (404, lambda: call("DELETE", "/admin/routes/probe"))):
        t = time.monotonic()
        act()
        pending = set(ports)
        while pending:
            pending = {p for p in pending if status(f"http://127.0.0.1:{p}/health") != want}
        print(round((time.monotonic() - t) * 1000, 2))
PY
}

for round in $(seq "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  run "fan-out QoS 0 (deliveries/s)" fanout deliveries_per_s QOS=0
  run "fan-out QoS 1 (deliveries/s)" fanout deliveries_per_s QOS=1
  run "fan-in QoS 1 (msgs/s)" fanin msgs_per_s QOS=1
  run "latency p50 QoS 0 (us)" latency p50_us QOS=0
  run "latency p99 QoS 0 (us)" latency p99_us QOS=0
  run "latency p99 QoS 1 (us)" latency p99_us QOS=1
  wamp_run "RPC 10 callers x 32:" CALLERS=10 WINDOW=32
  wamp_run "RPC 1 call at a time:" CALLERS=1 WINDOW=1
done
changes=$(propagation | tr '\n' ' ')

printf '\n%-34s %12s %12s %8s\n' "MQTT" "one node" "A -> B" ratio
for name in "fan-out QoS 0 (deliveries/s)" "fan-out QoS 1 (deliveries/s)" "fan-in QoS 1 (msgs/s)" \
  "latency p50 QoS 0 (us)" "latency p99 QoS 0 (us)" "latency p99 QoS 1 (us)"; do
  one=$(median "${results[$name/one]}")
  cross=$(median "${results[$name/cross]}")
  printf '%-34s %12s %12s %8s\n' "$name" "$one" "$cross" "$(awk -v a="$cross" -v b="$one" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
done
printf '\n%-34s %12s %12s %8s\n' "WAMP (callee on A)" "caller on A" "caller on B" ratio
for name in "RPC 10 callers x 32:" "RPC 1 call at a time:"; do
  for f in calls_per_s p50_us p99_us; do
    one=$(median "${results[$name $f/one]}")
    cross=$(median "${results[$name $f/cross]}")
    printf '%-34s %12s %12s %8s\n' "$name $f" "$one" "$cross" "$(awk -v a="$cross" -v b="$one" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
  done
done
sorted=$(tr ' ' '\n' <<<"$changes" | grep . | sort -n)
printf '\nroute change served by all 3 nodes (ms, %d changes): median %s, p90 %s, max %s\n' \
  "$(wc -l <<<"$sorted")" "$(median "$changes")" \
  "$(awk '{ v[NR] = $1 } END { print v[int(NR * 0.9)] }' <<<"$sorted")" "$(tail -1 <<<"$sorted")"
echo "(servers share one core: the cross-node figures include NATS and a second node on it)"
if [ ${#problems[@]} -gt 0 ]; then
  echo "problems:"
  printf '  %s\n' "${problems[@]}"
fi
