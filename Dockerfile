# Multi-stage build of the agent image (one static-enough binary with the eBPF object
# embedded). Build from the repository root: docker build -t lb-agent .
FROM rust:1.95-bookworm AS build
# The eBPF object needs the pinned nightly and bpf-linker 0.10.3 (it loads the nightly's LLVM).
RUN rustup toolchain install nightly-2026-05-20 --profile minimal --component rust-src \
 && cargo install bpf-linker --version 0.10.3 --locked
WORKDIR /src
COPY . .
RUN cargo build --release -p lb-agent \
 && cp target/release/lb-agent /lb-agent

# BGP mode's speaker: GoBGP's gobgpd, the release the agent's API messages follow
# (xtask/src/gobgp.rs), built static from the Go module proxy.
FROM golang:1.26-bookworm AS gobgp
RUN CGO_ENABLED=0 GOBIN=/out go install github.com/osrg/gobgp/v4/cmd/gobgpd@v4.8.0

# Runtime: glibc and nothing else; the agent talks netlink and bpf(2) directly.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /lb-agent /usr/local/bin/lb-agent
# Started by the agent only when a BGP-mode LoadBalancerConfig applies to the node.
COPY --from=gobgp /out/gobgpd /usr/local/bin/gobgpd
# Capabilities come from the DaemonSet (BPF, NET_ADMIN, PERFMON, SYS_RESOURCE); the user must
# be root for them to apply to the binary.
USER 0:0
ENTRYPOINT ["/usr/local/bin/lb-agent"]
