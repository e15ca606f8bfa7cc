# k8s-job-worker image: build with the Rust toolchain, run on a small non-root base.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY src ./src
COPY tools ./tools
RUN cargo build --release --locked -p k8s-job-worker --bin k8s-job-worker \
 && strip target/release/k8s-job-worker

# distroless/cc: glibc and CA certificates, no shell, runs as nonroot (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/k8s-job-worker /usr/local/bin/k8s-job-worker
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/k8s-job-worker"]
CMD ["run"]
