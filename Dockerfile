# syntax=docker/dockerfile:1
# fanfinity image: built on rust:1-bookworm, run on debian:bookworm-slim.
# Used by docker-compose.yml; `docker build -t fanfinity .` works on its own too.

FROM rust:1-bookworm AS builder

# rdkafka builds librdkafka from source (cmake, make, a C compiler); zlib for its libz
# feature. rust:1-bookworm already has gcc and make.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# The workspace needs every member's manifest; loadtest is built only if asked for.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY loadtest ./loadtest
COPY benches ./benches

# The caches keep the registry and compiled dependencies between builds; the binary is
# copied out in the same step because the cache mount is gone afterwards.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin fanfinity \
    && install -D -m 0755 target/release/fanfinity /out/fanfinity


FROM debian:bookworm-slim AS runtime

# ca-certificates for TLS endpoints, curl for the compose healthcheck. librdkafka is
# linked statically; zlib (libz) is part of the base image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin fanfinity
COPY --from=builder /out/fanfinity /usr/local/bin/fanfinity
# The PUBLIC development keys, for `docker compose up` on a laptop only; a deployment
# mounts its own file with keys made by `fanfinity keys new`.
COPY scripts/dev.toml /etc/fanfinity/dev.toml

USER fanfinity
ENV FANFINITY_HTTP__LISTEN=0.0.0.0:8080
EXPOSE 8080
# SIGTERM starts fanfinity's graceful shutdown: drain, flush, commit, exit.
STOPSIGNAL SIGTERM
CMD ["fanfinity", "serve"]
