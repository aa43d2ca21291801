# syntax=docker/dockerfile:1
# kvroute's image: the `kvroute` binary alone on distroless, as the non-root user, with a
# read-only root filesystem in mind (it writes nothing to disk). Built from the workspace
# root: docker build -t REGISTRY/kvroute:TAG .   (docs/deploy.md)

# The toolchain of rust-toolchain.toml, so that rustup has nothing to fetch. ring and the
# tokenizers' esaxx compile C and C++ with the image's gcc; no protoc is needed (the ext_proc
# types come pre-generated).
FROM docker.io/library/rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit); the binary is copied
# out of the cached target directory, which is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin kvroute \
    && cp target/release/kvroute /kvroute

# glibc, libgcc and libstdc++ (the C++ of the tokenizers), CA certificates, and the
# "nonroot" user (65532); no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /kvroute /kvroute
USER 65532:65532
# ext_proc gRPC, gRPC health, admin HTTP (/metrics, /healthz, /readyz).
EXPOSE 9002 9003 9090
ENTRYPOINT ["/kvroute"]
CMD ["serve", "--help"]
