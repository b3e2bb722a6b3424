# The gateway's container image: built in a Rust image, run FROM scratch.
#   docker build -t gateway:0.1.0 .        (or podman build / buildah bud)
# The runtime image holds the binary, the few shared libraries it links and
# a passwd file (scripts/image-rootfs.sh): no shell, no package manager. It
# runs as the non-root user 65532 and suits a read-only root filesystem.

ARG RUST_IMAGE=docker.io/library/rust:1.85-bookworm

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The lock file pins every dependency; the cache mounts keep rebuilds fast.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p gateway --bin gateway \
    && scripts/image-rootfs.sh target/release/gateway /rootfs

FROM scratch AS runtime
COPY --from=build /rootfs /
USER 65532:65532
# Every interface of the container (127.0.0.1, the binary's default, is
# unreachable from outside it); the operations routes on their own port.
ENV GATEWAY_ADDR=0.0.0.0:8080 \
    GATEWAY_ADMIN_ADDR=0.0.0.0:9090 \
    GATEWAY_LOG_FORMAT=json
# 8080: clients (WebSocket /ws, SSE /sse) and the publish API (/api).
# 9090: operations (/livez, /readyz, /metrics, /admin/drain); keep it private.
EXPOSE 8080 9090
ENTRYPOINT ["/gateway"]
