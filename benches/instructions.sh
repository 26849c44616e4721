#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: on a
# shared VM whose clock-based figures move 10-20% between runs, this count
# moves well under 1%, so it shows what a change to the hot path did.
#
#   benches/instructions.sh [BINARY]   # needs: valgrind, nginx (nginx-light), wrk, curl
#   ROUTE=jwt benches/instructions.sh  # the same through a JWT-validated route
#   KEEP=cg.out benches/instructions.sh  # keeps the profile for callgrind_annotate
set -euo pipefail
cd "$(dirname "$0")/.."
UP_PORT=18080 TG_PORT=18082 TG_ADMIN=19090

source benches/common.sh
require valgrind callgrind_control nginx wrk curl taskset objdump python3

bin=${1:-target/release/tollgate}
for port in $UP_PORT $TG_PORT; do
  ! curl -s "http://127.0.0.1:$port/" >/dev/null 2>&1 || { echo "port $port is in use"; exit 1; }
done
[ $# -gt 0 ] || cargo build --release --quiet
start_upstream 0 $UP_PORT
TOKEN=$(bench_token)
cat > "$work/gateway.yaml" <<CONF
listeners: [{ name: sidecar, bind: "127.0.0.1:$TG_PORT" }]
admin: { bind: "127.0.0.1:$TG_ADMIN" }
proxy: { access_log: false }
reload: { watch: false }
routes:
  - name: up
    match: { path_prefix: / }
    upstream: { targets: ["http://127.0.0.1:$UP_PORT"] }
  - name: jwt
    match: { path_prefix: /jwt }
    upstream: { targets: ["http://127.0.0.1:$UP_PORT"] }
    auth: jwt
    forward_claims: { x-user: sub }
    policy:
      - allow: { scopes: [bench.read] }
auth:
  providers:
    - { name: bench, issuer: "https://idp.bench", audiences: [bench], public_keys: ["$work/ed.pub.pem"] }
CONF
case ${ROUTE:-plain} in
  plain) target=(http://127.0.0.1:$TG_PORT/) ;;
  jwt) target=(-H "Authorization: Bearer $TOKEN" http://127.0.0.1:$TG_PORT/jwt/) ;;
  *) echo "ROUTE is plain or jwt"; exit 1 ;;
esac
TOLLGATE_LOG=warn taskset -c 1 valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
  --dump-instr=yes --compress-strings=no --compress-pos=no \
  "$bin" -c "$work/gateway.yaml" >/dev/null 2>"$work/valgrind.log" &
pids+=($!)
wait_http "http://127.0.0.1:$TG_PORT/"
taskset -c 0 wrk -t1 -c32 -d3s "${target[@]}" >/dev/null # warm-up
callgrind_control -z >/dev/null 2>&1
out=$(taskset -c 0 wrk -t1 -c32 -d10s "${target[@]}")
grep -q "Non-2xx" <<<"$out" && { echo "errors during the run"; echo "$out"; exit 1; }
callgrind_control -d >/dev/null 2>&1
for _ in $(seq 50); do compgen -G "$work/cg.out.*" >/dev/null && break; sleep 0.2; done
sleep 1 # the dump is written while callgrind_control returns
[ -z "${KEEP:-}" ] || cat "$work"/cg.out.* > "$KEEP"
requests=$(awk '/requests in/ {print $1}' <<<"$out")
instructions=$(cat "$work"/cg.out.* | awk '/^summary:/ {s += $2} END {print s}')
awk -v i="$instructions" -v r="$requests" 'BEGIN { printf "%d requests, %.0f instructions per request\n", r, i / r }'
# Locked (atomic read-modify-write) instructions in tollgate's own code:
# each costs some 7 ns here however well predicted (a store-buffer drain),
# so they weigh far more than their count among the instructions.
python3 - "$bin" "$requests" "$work"/cg.out.* <<'PY'
import os, re, subprocess, sys
binary, requests, dumps = os.path.realpath(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary], capture_output=True, text=True).stdout
locked = {int(m.group(1), 16) for m in re.finditer(r"^\s*([0-9a-f]+):\s+(?:lock |xchg\s.*\()", listing, re.M)}
count = 0
for dump in dumps:
    ours = skip = False
    for line in open(dump):
        if line.startswith("ob="):
            ours = os.path.realpath(line[3:].strip()) == binary
        elif line.startswith("calls="):
            skip = True  # the next cost line is the call's, counted in the callee
        elif line.startswith("0x"):
            if not skip and ours:
                fields = line.split()
                if int(fields[0], 16) in locked:
                    count += int(fields[-1])
            skip = False
print(f"{count / requests:.1f} locked instructions per request")
PY
