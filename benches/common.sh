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
cgroups=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for c in upstream proxy; do
    [ -f "$work/$c.pid" ] && kill "$(cat "$work/$c.pid")" 2>/dev/null || true
  done
  # A cgroup can go once its processes have exited.
  for g in "${cgroups[@]}"; do
    for _ in $(seq 20); do rmdir "$g" 2>/dev/null && break; sleep 0.1; done
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

# cpu_limit NAME PERCENT PID...: caps the processes at PERCENT of one core
# with a CFS quota over a 100 ms period, as `docker run --cpus` or a
# Kubernetes CPU limit does. cgroup v1 or v2; fails when neither lets us
# (not root, or no cpu controller delegated to us).
cpu_limit() {
  local name=$1 percent=$2 root dir
  shift 2
  if [ -f /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
    root=/sys/fs/cgroup/cpu
  elif grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
    root=/sys/fs/cgroup
    echo +cpu >"$root/cgroup.subtree_control" 2>/dev/null || true
  else
    return 1
  fi
  dir=$root/tollgate-bench-$name-$$
  mkdir "$dir" 2>/dev/null || return 1
  cgroups+=("$dir")
  if [ -f "$dir/cpu.max" ]; then
    echo "$((percent * 1000)) 100000" >"$dir/cpu.max" || return 1
  else
    echo 100000 >"$dir/cpu.cfs_period_us" && echo $((percent * 1000)) >"$dir/cpu.cfs_quota_us" || return 1
  fi
  for p in "$@"; do echo "$p" >"$dir/cgroup.procs" || return 1; done
}

# wait_http URL: until it answers (20 s at most: valgrind starts slowly).
wait_http() { for _ in $(seq 200); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "not up: $1"; exit 1; }

# median "v1 v2 ..." -> the middle value (the upper middle for an even count).
# The load scripts alternate their targets over $ROUNDS rounds and report
# medians: on a shared VM one run can be 20-30% off the next.
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{ v[NR] = $1 } END { print v[int(NR / 2) + 1] }'; }
ROUNDS=${ROUNDS:-3}

# per_round A B: A's figure over B's within each round (the lists that
# `median` takes, in round order) -> "median (lowest-highest)". Targets that
# ran side by side share the VM's mood of the moment: these ratios move less
# than the ratio of two medians.
per_round() {
  local r
  r=$(paste -d' ' <(tr ' ' '\n' <<<"$1" | grep .) <(tr ' ' '\n' <<<"$2" | grep .) | awk '{ printf "%.4f\n", $1 / $2 }' | sort -n)
  printf '%.2f (%.2f-%.2f)' "$(median "$(tr '\n' ' ' <<<"$r")")" "$(head -1 <<<"$r")" "$(tail -1 <<<"$r")"
}

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

# field NAME: the value of `NAME=<number>` in the load tools' output line.
field() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p"; }
