# tollgate's container image, for machines that can pull base images.
# (Where nothing can be pulled, deploy/image/build.sh builds the same runtime
# image from a static binary and the host's CA certificates.)
#
#   docker build -t tollgate .
#   docker run -p 8082:8082 -v $PWD/gateway.yaml:/etc/tollgate/gateway.yaml tollgate

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# A static binary: the runtime image needs no libc.
RUN target="$(uname -m)-unknown-linux-gnu" \
 && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target "$target" --bin tollgate \
 && mkdir -p /out/var/lib/tollgate \
 && cp "target/$target/release/tollgate" /out/tollgate

FROM debian:bookworm-slim AS certs
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates

FROM scratch
COPY --from=certs /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/tollgate /usr/local/bin/tollgate
COPY --from=build --chown=65532:65532 /out/var/lib/tollgate /var/lib/tollgate
COPY deploy/image/gateway.yaml /etc/tollgate/gateway.yaml
# Not root: the gateway needs no privileges (ports above 1024).
USER 65532:65532
EXPOSE 8082 8443
HEALTHCHECK --interval=10s --timeout=6s --start-period=5s \
  CMD ["/usr/local/bin/tollgate", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["run", "-c", "/etc/tollgate/gateway.yaml", "--log-format", "json"]
