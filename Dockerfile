# syntax=docker/dockerfile:1
# The switchyard image: one binary for the gateway and the bundled backend, the sample
# model repository and the sample policies. deploy/kubernetes runs it as both.
#   docker build -t switchyard:0.1.0 .
# Not built in CI (no container runtime there); deploy/kubernetes/README.md says what is.

# Rust at the version CI tests with (the workspace needs 1.91 or later), on Debian 12 like
# the runtime image below, so the binary's glibc matches.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
# pingora compresses with zlib-ng, which libz-ng-sys builds with cmake; zstd-sys needs
# only the C compiler the image has. The protobufs compile in pure Rust (protox): no protoc.
# cmake is not pinned to a version: Debian stable changes it only for fixes, and a pinned
# version vanishes from the mirrors once one lands.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The registry and target folders are BuildKit caches, so a rebuild recompiles only what
# changed; the binary is copied out of the cache before the step ends.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin switchyard \
    && install -D -m 755 target/release/switchyard /out/switchyard

# glibc, libgcc and CA certificates, no shell or package manager; `nonroot` is uid 65532,
# the user deploy/kubernetes runs as. Pin it by digest where images must be reproducible.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/switchyard /usr/local/bin/switchyard
# Read-only data the processes serve. In Kubernetes the policies ConfigMap is mounted over
# /srv/switchyard/policies and gateway.yaml at /srv/switchyard/config; with this working
# folder, `switchyard rollout status` and `switchyard check` in the container find that
# gateway.yaml by their default --config (config/gateway.yaml).
COPY backends/model_repository /srv/switchyard/backends/model_repository
COPY policies /srv/switchyard/policies
WORKDIR /srv/switchyard
USER 65532:65532
# REST, gRPC, admin and metrics (the gateway); gRPC and metrics (a backend).
EXPOSE 8000 8001 8002
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["--help"]
