# One image for every role (operator, relay, replay, admin, migrate): the subcommand picks it.
# Build: docker build -t inventory-outbox .
FROM rust:1.95-bookworm AS build
WORKDIR /src
# cmake and a C toolchain build librdkafka (rdkafka's bundled build).
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY src src
COPY migrations migrations
COPY benches benches
COPY examples examples
COPY tests tests
RUN cargo build --release --locked --bin inventory-outbox

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 65532 --no-create-home --shell /usr/sbin/nologin outbox
COPY --from=build /src/target/release/inventory-outbox /usr/local/bin/inventory-outbox
# Non-root, as the chart's securityContext also requires.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/inventory-outbox"]
CMD ["--help"]
