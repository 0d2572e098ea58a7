# syntax=docker/dockerfile:1
# kscale as a static binary in an otherwise empty image: no shell, no package manager, a non-root
# user. The build stage is the same `cargo build` the README documents and CI checks:
#   rustup target add x86_64-unknown-linux-musl   # plus musl-tools (musl-gcc) for ring's C code
#   cargo build --release --locked --target x86_64-unknown-linux-musl
#   strip target/x86_64-unknown-linux-musl/release/kscale   # the release profile keeps line tables
#
#   docker build -t kscale/kscale:0.1.0 .

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --bin kscale \
 && cp target/x86_64-unknown-linux-musl/release/kscale /kscale \
 && strip /kscale

FROM scratch
# System roots for Prometheus over https (rustls-native-certs reads /etc/ssl/certs).
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /kscale /kscale
# The uid/gid the chart's securityContext expects (no /etc/passwd needed).
USER 65532:65532
EXPOSE 8080 6443
ENTRYPOINT ["/kscale"]
CMD ["run"]
