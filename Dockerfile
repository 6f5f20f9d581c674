# syntax=docker/dockerfile:1
#
# gamma-node's image: the proxy-agent binary (eBPF object embedded) on a minimal runtime image.
#
#   docker build -t gamma-node:dev .                     # the agent (the last stage)
#   docker build --target demo -t gamma-demo:dev .       # echo backend + curl, for deploy/kind/demo.sh
#
# The builder reproduces `cargo xtask setup` (xtask/src/setup.rs): stable Rust for the workspace,
# a nightly toolchain with rust-src for the eBPF crate, and bpf-linker built against the nightly's
# own libLLVM (no prebuilt binaries), which proxy-agent/build.rs (aya-build) then calls.

# Debian 12 on both sides: the binary links the builder's glibc, the runtime image must have it.
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# setup.rs `nightly_rust_src`: the nightly toolchain (minimal profile) with rust-src, for build-std.
# It must be called `nightly`: aya-build runs `rustup run nightly cargo build` for the eBPF crate.
RUN rustup toolchain install nightly --profile minimal \
 && rustup component add rust-src --toolchain nightly

# setup.rs `bpf_linker`: llvm-sys wants an LLVM "prefix" whose lib/ holds libLLVM.so and its soname,
# both pointing at the nightly's libLLVM.so.*; the major version from `rustc +nightly -vV` picks
# bpf-linker's `llvm-NN` feature. Like setup.rs, this takes the current nightly: should its LLVM be
# newer than any bpf-linker release supports, this step fails naming the missing feature.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    set -eux; \
    llvm_major="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"; \
    lib="$(find "$(rustc +nightly --print sysroot)/lib" -maxdepth 1 -name 'libLLVM.so.*' | head -n 1)"; \
    test -n "${llvm_major}"; \
    test -n "${lib}"; \
    prefix="${CARGO_HOME}/bpf-linker-llvm-${llvm_major}"; \
    mkdir -p "${prefix}/lib"; \
    ln -sf "${lib}" "${prefix}/lib/libLLVM.so"; \
    ln -sf "${lib}" "${prefix}/lib/$(basename "${lib}")"; \
    LLVM_PREFIX="${prefix}" cargo +nightly install bpf-linker --force \
        --no-default-features --features "llvm-${llvm_major}"; \
    bpf-linker --version

WORKDIR /src
COPY . .
# The stable toolchain of the image builds the workspace; proxy-agent/build.rs builds the eBPF crate
# with the nightly and bpf-linker from above. Caches: the crates and the target folder (so the
# binary is copied out of it in the same step).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p proxy-agent --bin proxy-agent \
 && install -D -m 0755 target/release/proxy-agent /out/proxy-agent

# The echo backend the demo's catalog pods run (tests/src/bin/echo.rs).
FROM builder AS demo-builder
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p gamma-tests --bin gamma-echo \
 && install -D -m 0755 target/release/gamma-echo /out/gamma-echo

# Demo pods only (catalog backends and curl clients); never the agent's image.
FROM debian:bookworm-slim AS demo
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=demo-builder /out/gamma-echo /usr/local/bin/gamma-echo
USER 65532:65532
CMD ["gamma-echo", "--name", "echo", "0.0.0.0:8080"]

# The agent: glibc, libgcc and CA certificates, no shell. The image's user is non-root (65532), for
# runs that need no capabilities (the manifest folder without --redirect). The DaemonSet runs it as
# uid 0 with every capability dropped but NET_ADMIN and SYS_ADMIN: Kubernetes sets no ambient
# capabilities, so only uid 0 keeps added ones (see deploy/base/daemonset.yaml). No file
# capabilities on the binary: they would make every run of the image privileged.
FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=builder /out/proxy-agent /usr/local/bin/proxy-agent
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/proxy-agent"]
