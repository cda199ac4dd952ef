# Stand-in for rust:1.95-bookworm where Docker Hub cannot be reached (tools/compose-images.sh
# builds it): the host's Rust toolchain (the build context) on the local Debian bookworm base,
# with the official image's CARGO_HOME and the C toolchain build scripts need.
ARG BASE_IMAGE=katz-local/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config ca-certificates git python3 \
 && rm -rf /var/lib/apt/lists/*
COPY . /usr/local/rust/
ENV CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/cargo/bin && cargo --version && rustc --version
