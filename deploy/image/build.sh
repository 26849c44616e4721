#!/usr/bin/env bash
# Builds tollgate's runtime image without pulling anything: a static binary
# (glibc, +crt-static) and the host's CA certificates in a FROM scratch
# image, the same layout as the Dockerfile's. Also builds the example
# services' images (bar: busybox httpd; foo: a busybox client loop), from
# Debian's busybox-static. With --cluster, the cluster build instead
# (`--features cluster`, same layout) and etcd's and NATS's images from
# Debian's etcd-server and nats-server binaries (each with the libc and
# loader it links, in a FROM scratch image). Quiet unless something fails.
#
#   deploy/image/build.sh            # tollgate:local, tollgate-example-bar:local, tollgate-example-foo:local
#   deploy/image/build.sh --cluster  # tollgate:cluster-local, tollgate-etcd:local, tollgate-nats:local, the examples
#   TOLLGATE_BIN=path deploy/image/build.sh [--cluster]   # that static binary (built as above) instead of building
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=$(uname -m)-unknown-linux-gnu   # x86_64 or aarch64
cluster=no
case "${1:-}" in
  --cluster) cluster=yes ;;
  "") ;;
  *) echo "usage: deploy/image/build.sh [--cluster]"; exit 2 ;;
esac

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
built=()
# `docker build`, quiet unless it fails.
build() {
  if ! docker build -q -t "$1" "$2" >"$ctx/build.log" 2>&1; then
    cat "$ctx/build.log"
    exit 1
  fi
  built+=("$1")
}

# tollgate_image TAG [cargo args...]: the static binary in a FROM scratch image.
tollgate_image() {
  local tag=$1 dir=$ctx/gw-${1//[:\/]/-}
  shift
  local binary=${TOLLGATE_BIN:-target/$TARGET/release/tollgate}
  if [ -z "${TOLLGATE_BIN:-}" ]; then
    RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --locked --quiet --target "$TARGET" --bin tollgate "$@"
  fi
  mkdir -p "$dir/var/lib/tollgate" "$dir/etc/ssl/certs"
  cp "$binary" "$dir/tollgate"
  strip "$dir/tollgate" 2>/dev/null || true
  cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/"
  cp deploy/image/gateway.yaml "$dir/gateway.yaml"
  cat > "$dir/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY tollgate /usr/local/bin/tollgate
COPY --chown=65532:65532 var/lib/tollgate /var/lib/tollgate
COPY gateway.yaml /etc/tollgate/gateway.yaml
USER 65532:65532
EXPOSE 8082 8443
HEALTHCHECK --interval=10s --timeout=6s --start-period=5s CMD ["/usr/local/bin/tollgate", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["run", "-c", "/etc/tollgate/gateway.yaml", "--log-format", "json"]
DOCKERFILE
  build "$tag" "$dir"
}

# host_binary_image TAG BINARY DATA_DIR PORTS: a dynamically linked host
# binary with exactly the shared objects ldd names (libc and the loader for
# Debian's Go builds) in a FROM scratch image, running as 65532 with a
# writable DATA_DIR. Arguments are given at `docker run` / in compose.
host_binary_image() {
  local tag=$1 binary=$2 data=$3 ports=$4 dir=$ctx/bin-${1//[:\/]/-}
  [ -x "$binary" ] || { echo "needs $binary (Debian's $(basename "$binary") package)"; exit 1; }
  mkdir -p "$dir/data" "$dir/root/usr/local/bin"
  cp "$binary" "$dir/root/usr/local/bin/"
  local lib
  for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
    mkdir -p "$dir/root$(dirname "$lib")"
    cp -L "$lib" "$dir/root$lib"
  done
  cat > "$dir/Dockerfile" <<DOCKERFILE
FROM scratch
COPY root/ /
COPY --chown=65532:65532 data/ $data/
USER 65532:65532
EXPOSE $ports
ENTRYPOINT ["/usr/local/bin/$(basename "$binary")"]
DOCKERFILE
  build "$tag" "$dir"
}

if [ "$cluster" = yes ]; then
  tollgate_image tollgate:cluster-local --features cluster
  host_binary_image tollgate-etcd:local "$(command -v etcd || echo /usr/bin/etcd)" /var/lib/etcd "2379 2380"
  host_binary_image tollgate-nats:local "$(command -v nats-server || echo /usr/sbin/nats-server)" /var/lib/nats "4222 6222 8222"
else
  tollgate_image tollgate:local
fi

busybox=$(command -v busybox || true)
if [ -z "$busybox" ] || ! file -L "$busybox" 2>/dev/null | grep -q "statically linked"; then
  busybox=/bin/busybox
fi
[ -x "$busybox" ] || { echo "needs Debian's busybox-static (apt-get install busybox-static)"; exit 1; }

mkdir -p "$ctx/bar/www" "$ctx/foo"
cp "$busybox" "$ctx/bar/busybox"
echo "bar says hello" > "$ctx/bar/www/index.html"
cat > "$ctx/bar/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY busybox /bin/busybox
COPY www /www
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/bin/busybox", "httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
DOCKERFILE
build tollgate-example-bar:local "$ctx/bar"

cp "$busybox" "$ctx/foo/busybox"
cat > "$ctx/foo/foo.sh" <<'SCRIPT'
# foo: gets a token from the gateway on its node and calls bar through it.
bb=/bin/busybox
gw=${GATEWAY:-http://localhost:8082}
while true; do
  secret=$($bb cat /run/secrets/foo_client_secret)
  token=$($bb wget -qO- --post-data "grant_type=client_credentials&client_id=foo&client_secret=$secret" "$gw/oauth2/token" \
    | $bb sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')
  answer=$($bb wget -qO- --header "Authorization: Bearer $token" "$gw/bar/" 2>&1) \
    && echo "foo: bar answered: $answer" || echo "foo: the call to bar failed: $answer"
  $bb sleep "${INTERVAL:-10}"
done
SCRIPT
cat > "$ctx/foo/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY busybox /bin/busybox
COPY foo.sh /foo.sh
USER 65532:65532
ENTRYPOINT ["/bin/busybox", "sh", "/foo.sh"]
DOCKERFILE
build tollgate-example-foo:local "$ctx/foo"

for image in "${built[@]}"; do
  printf '%-30s %s\n' "$image" "$(docker image inspect -f '{{.Size}}' "$image" | awk '{ printf "%.1f MB", $1 / 1e6 }')"
done
