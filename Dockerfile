# sse-relay container image.
#
#   docker build -t sse-relay .
#   docker run -d --name sse-relay \
#     -v "$PWD/relay.yaml:/etc/sse-relay/relay.yaml:ro" \
#     -v sse-relay-data:/var/lib/sse-relay \
#     --env-file relay.env -p 9464:9464 sse-relay
#
# Inside a container the admin server must listen on 0.0.0.0:9464 (admin.listen in relay.yaml),
# or /metrics, /healthz and /readyz are reachable only from the container's own network
# namespace: a published port, Prometheus or a scraping sidecar in another container would get
# nothing. The HEALTHCHECK below runs inside the container and reaches it on 127.0.0.1 either way.
# Logs are JSON because stdout is not a terminal; `docker run -t` or --log-format text gives text.

# ---- build ------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src

# Build the dependencies alone first, against an empty crate with the same manifest, so that
# this layer is reused until Cargo.toml or Cargo.lock changes. The workspace's other member, the
# test fixtures, is never built here, but cargo needs its manifest and a library root to load
# the workspace.
COPY Cargo.toml Cargo.lock ./
COPY fixtures/Cargo.toml ./fixtures/
RUN mkdir -p src fixtures/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs fixtures/src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

COPY src ./src
# COPY keeps the sources' older mtimes, so touch the crate roots or cargo would take the empty
# crate built above as up to date.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/sse-relay /out/sse-relay \
    && mkdir /out/state

# ---- runtime ----------------------------------------------------------------------------------
# glibc, libgcc and CA certificates (rustls reads the system roots), no shell, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=build /out/sse-relay /usr/local/bin/sse-relay
# The image has no shell to mkdir and chown with, so the state directory comes from the build
# stage, owned by the non-root user; a new named volume inherits that ownership.
COPY --from=build --chown=65532:65532 /out/state /var/lib/sse-relay
# For reference only; mount the real config at /etc/sse-relay/relay.yaml.
COPY relay.example.yaml /etc/sse-relay/relay.example.yaml

USER 65532:65532
# storage.path defaults to ./data, so the queue lands in the volume.
WORKDIR /var/lib/sse-relay
VOLUME /var/lib/sse-relay
# Lets `docker run IMAGE check` find the config without --config.
ENV SSE_RELAY_CONFIG=/etc/sse-relay/relay.yaml
EXPOSE 9464

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/sse-relay", "health"]
ENTRYPOINT ["/usr/local/bin/sse-relay"]
CMD ["run", "--config", "/etc/sse-relay/relay.yaml"]
