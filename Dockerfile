# syntax=docker/dockerfile:1
# cachefront: build with the Rust toolchain, run on a slim Debian.
#   docker build -t cachefront .
#   docker compose up --build        (with Valkey and PostgreSQL, see docker-compose.yml)

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the crate registry and build artefacts between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin cachefront \
 && mkdir -p /out/etc \
 && cp target/release/cachefront /out/cachefront \
 && if [ -f config.toml ]; then cp config.toml /out/etc/config.toml; fi

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --no-create-home --shell /usr/sbin/nologin cachefront
COPY --from=build /out/cachefront /usr/local/bin/cachefront
COPY --from=build /out/etc/ /etc/cachefront/
ENV CACHEFRONT_LISTEN=0.0.0.0:6380 \
    RUST_LOG=info
USER cachefront
EXPOSE 6380
ENTRYPOINT ["/usr/local/bin/cachefront"]
