#!/usr/bin/env bash
# MQTT load comparison in one run: tollgate's broker and mosquitto (Debian),
# each pinned to the same core, the load tool (benches/mqtt_load.rs) on the
# other. Both without persistence, anonymous clients, every topic allowed
# (tollgate still runs every publish and subscription through its policy
# engine). The brokers take turns for ROUNDS rounds; each figure is the
# median of its rounds.
#
#   benches/mqtt_load.sh                   # needs: mosquitto, taskset
#   SECS=10 ROUNDS=5 IDLE_CONNS=10000 benches/mqtt_load.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
BROKER_CPU=${BROKER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
IDLE_CONNS=${IDLE_CONNS:-10000}
# Fan-in QoS 0 offered at this rate (all publishers together): unpaced, a
# broker that takes publishes faster than its subscriber reads drops the
# excess (QoS 0), and the load tool's one core goes to publishing.
FANIN_RATE=${FANIN_RATE:-200000}
TG_PORT=18883 MQ_PORT=18884 TG_ADMIN=19093

source benches/common.sh
require mosquitto taskset

cargo build --release --quiet
cargo bench --bench mqtt_load --no-run --quiet 2>/dev/null
tool=$(ls -t target/release/deps/mqtt_load-* | grep -v '\.d$' | head -1)

cat > "$work/mosquitto.conf" <<CONF
listener $MQ_PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 1000
log_dest none
CONF
cat > "$work/gateway.yaml" <<CONF
listeners:
  - { name: sidecar, bind: 127.0.0.1:0 }
  - { name: mqtt, bind: 127.0.0.1:$TG_PORT, protocol: mqtt }
admin: { bind: 127.0.0.1:$TG_ADMIN }
runtime: { workers: 1 }
mqtt:
  auth: { anonymous: true }
  policy: [ { allow: { actions: [publish, subscribe], topics: ["#"] } } ]
  persistence: { enabled: false }
  limits: { max_inflight: 1000 }
  sys_interval: 0s
CONF

TOLLGATE_LOG=warn taskset -c "$BROKER_CPU" target/release/tollgate run -c "$work/gateway.yaml" 2>"$work/tollgate.log" &
tg_pid=$!
pids+=("$tg_pid")
taskset -c "$BROKER_CPU" mosquitto -c "$work/mosquitto.conf" 2>"$work/mosquitto.log" &
mq_pid=$!
pids+=("$mq_pid")
sleep 1
wait_http "http://127.0.0.1:$TG_ADMIN/healthz"

load() { # port scenario env... -> the tool's line
  local port=$1 scenario=$2
  shift 2
  env TARGET="127.0.0.1:$port" SCENARIO="$scenario" SECS="$SECS" "$@" taskset -c "$LOAD_CPU" "$tool"
}

declare -A results
run() { # name scenario field env...
  local name=$1 scenario=$2 key=$3
  shift 3
  for broker in tollgate mosquitto; do
    local port=$TG_PORT
    [ $broker = mosquitto ] && port=$MQ_PORT
    local v
    v=$(load "$port" "$scenario" "$@" | field "$key")
    results[$name/$broker]="${results[$name/$broker]:-} $v"
  done
}

for round in $(seq "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  run "fan-in QoS 0 at $FANIN_RATE/s (msgs/s)" fanin msgs_per_s QOS=0 RATE="$FANIN_RATE"
  run "fan-in QoS 0 unpaced (msgs/s)" fanin msgs_per_s QOS=0
  run "fan-in QoS 1 (msgs/s)" fanin msgs_per_s QOS=1
  run "fan-out QoS 0 (deliveries/s)" fanout deliveries_per_s QOS=0
  run "fan-out QoS 1 (deliveries/s)" fanout deliveries_per_s QOS=1
  run "latency p50 QoS 0 (us)" latency p50_us QOS=0
  run "latency p99 QoS 0 (us)" latency p99_us QOS=0
  run "latency p50 QoS 1 (us)" latency p50_us QOS=1
  run "latency p99 QoS 1 (us)" latency p99_us QOS=1
  run "connections (connects/s)" connrate connects_per_s
done

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
idle_rss() { # port pid -> KiB per idle connection
  local port=$1 pid=$2 before after
  before=$(rss_kib "$pid")
  coproc IDLE { env TARGET="127.0.0.1:$port" SCENARIO=idle CONNS="$IDLE_CONNS" taskset -c "$LOAD_CPU" "$tool"; }
  read -r _ <&"${IDLE[0]}"
  sleep 1
  after=$(rss_kib "$pid")
  exec {IDLE[1]}>&-
  wait "$IDLE_PID" 2>/dev/null || true
  echo "$before $after"
}
read -r tg_before tg_after < <(idle_rss $TG_PORT $tg_pid)
read -r mq_before mq_after < <(idle_rss $MQ_PORT $mq_pid)

printf '\n%-40s %12s %12s %8s\n' "" tollgate mosquitto ratio
for name in "fan-in QoS 0 at $FANIN_RATE/s (msgs/s)" "fan-in QoS 0 unpaced (msgs/s)" "fan-in QoS 1 (msgs/s)" "fan-out QoS 0 (deliveries/s)" \
  "fan-out QoS 1 (deliveries/s)" "latency p50 QoS 0 (us)" "latency p99 QoS 0 (us)" \
  "latency p50 QoS 1 (us)" "latency p99 QoS 1 (us)" "connections (connects/s)"; do
  tg=$(median "${results[$name/tollgate]}")
  mq=$(median "${results[$name/mosquitto]}")
  printf '%-40s %12s %12s %8s\n' "$name" "$tg" "$mq" "$(awk -v a="$tg" -v b="$mq" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
done
printf '%-40s %12s %12s\n' "RSS idle (KiB)" "$tg_before" "$mq_before"
printf '%-40s %12s %12s\n' "RSS with $IDLE_CONNS clients (KiB)" "$tg_after" "$mq_after"
printf '%-40s %12s %12s\n' "per client (KiB)" \
  "$(awk -v a="$tg_before" -v b="$tg_after" -v n="$IDLE_CONNS" 'BEGIN { printf "%.1f", (b - a) / n }')" \
  "$(awk -v a="$mq_before" -v b="$mq_after" -v n="$IDLE_CONNS" 'BEGIN { printf "%.1f", (b - a) / n }')"
echo "(latency: lower is better; every other row: higher is better)"
