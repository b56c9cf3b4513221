# syntax=docker/dockerfile:1
# One image for every role (operator, relay, provision, cleanup, replay, admin, migrate): the
# subcommand picks it. Build: docker build -t ghcr.io/inventory-outbox/inventory-outbox:0.1.0 .

FROM rust:1.95-bookworm AS build
# cmake builds librdkafka (rdkafka's bundled, statically linked build).
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock rust-toolchain.toml build.rs ./
COPY src src
COPY migrations migrations
COPY schemas schemas
# Cargo.toml names these targets; they are not built here.
COPY benches benches
COPY examples examples
COPY tests tests
RUN cargo build --release --locked --bin inventory-outbox \
    && strip target/release/inventory-outbox

# glibc, libgcc and CA certificates, no shell and no package manager; uid/gid 65532 "nonroot".
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/inventory-outbox /usr/local/bin/inventory-outbox
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/inventory-outbox"]
CMD ["--help"]
