#!/usr/bin/env bash
# Builds tollgate's runtime image without pulling anything: a static binary
# (glibc, +crt-static) and the host's CA certificates in a FROM scratch
# image, the same layout as the Dockerfile's. Also builds the example
# services' images (bar: busybox httpd; foo: a busybox client loop), from
# Debian's busybox-static.
#
#   deploy/image/build.sh            # tollgate:local, tollgate-example-bar:local, tollgate-example-foo:local
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=$(uname -m)-unknown-linux-gnu   # x86_64 or aarch64

RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --quiet --target "$TARGET" --bin tollgate
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
# `docker build`, quiet unless it fails.
build() {
  if ! docker build -q -t "$1" "$2" >"$ctx/build.log" 2>&1; then
    cat "$ctx/build.log"
    exit 1
  fi
}

mkdir -p "$ctx/gw/var/lib/tollgate" "$ctx/gw/etc/ssl/certs"
cp "target/$TARGET/release/tollgate" "$ctx/gw/tollgate"
strip "$ctx/gw/tollgate" 2>/dev/null || true
cp /etc/ssl/certs/ca-certificates.crt "$ctx/gw/etc/ssl/certs/"
cp deploy/image/gateway.yaml "$ctx/gw/gateway.yaml"
cat > "$ctx/gw/Dockerfile" <<'DOCKERFILE'
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
build tollgate:local "$ctx/gw"

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

for image in tollgate:local tollgate-example-bar:local tollgate-example-foo:local; do
  printf '%-30s %s\n' "$image" "$(docker image inspect -f '{{.Size}}' "$image" | awk '{ printf "%.1f MB", $1 / 1e6 }')"
done
