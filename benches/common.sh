# Shared by the load scripts: tool checks, a work dir cleaned up on exit
# (with the nginx instances and background processes started from it), and
# an nginx config writer. Source it after `cd` to the repository root.

require() { # tool... (the hint says how to get them)
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install nginx-light wrk curl util-linux)"; exit 1; }
  done
}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for c in upstream proxy; do
    [ -f "$work/$c.pid" ] && kill "$(cat "$work/$c.pid")" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

nginx_conf() { # name http-block-body
  cat > "$work/$1.conf" <<CONF
worker_processes 1;
daemon on;
pid $work/$1.pid;
error_log $work/$1.err warn;
worker_rlimit_nofile 65536;
events { worker_connections 32768; }
http {
  access_log off;
  keepalive_requests 1000000;
  $2
}
CONF
}

# An nginx upstream answering `ok` on CPU $1, port $2.
start_upstream() {
  nginx_conf upstream "server { listen 127.0.0.1:$2; location / { return 200 \"ok\\n\"; } }"
  taskset -c "$1" nginx -q -p "$work" -c "$work/upstream.conf"
}

# wait_http URL: until it answers (20 s at most: valgrind starts slowly).
wait_http() { for _ in $(seq 200); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "not up: $1"; exit 1; }

# median "v1 v2 ..." -> the middle value (the upper middle for an even count).
# The load scripts alternate their targets over $ROUNDS rounds and report
# medians: on a shared VM one run can be 20-30% off the next.
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{ v[NR] = $1 } END { print v[int(NR / 2) + 1] }'; }
ROUNDS=${ROUNDS:-3}

# bench_token: makes $work/ed.pem and $work/ed.pub.pem and prints an EdDSA
# token for issuer https://idp.bench, audience bench, scope bench.read, valid
# for an hour; signed with openssl (a raw Ed25519 signature, as JWS wants).
bench_token() {
  openssl genpkey -algorithm ed25519 -out "$work/ed.pem" 2>/dev/null
  openssl pkey -in "$work/ed.pem" -pubout -out "$work/ed.pub.pem"
  local header claims sig
  header=$(printf '{"alg":"EdDSA","typ":"JWT"}' | b64url)
  claims=$(printf '{"iss":"https://idp.bench","aud":"bench","sub":"bench-user","scope":"bench.read","exp":%d}' $(( $(date +%s) + 3600 )) | b64url)
  printf '%s.%s' "$header" "$claims" > "$work/signing-input"
  sig=$(openssl pkeyutl -sign -rawin -inkey "$work/ed.pem" -in "$work/signing-input" | b64url)
  printf '%s.%s.%s' "$header" "$claims" "$sig"
}
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
