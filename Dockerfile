# syntax=docker/dockerfile:1
# Build: docker build -t bitbucket-connector .
# Run (examples/config-container.yaml binds 0.0.0.0 and takes these variables
# from the environment; `-e NAME` passes NAME from your shell):
#        docker run --rm -p 5557:5557 -p 5558:5558 \
#          -v $PWD/examples/config-container.yaml:/etc/bitbucket-connector/config.yaml:ro \
#          -e BITBUCKET_CLIENT_ID -e BITBUCKET_CLIENT_SECRET -e BITBUCKET_REDIRECT_URI \
#          -e CONNECTOR_DATA_KEY -e CONNECTOR_AUTH_TOKEN \
#          bitbucket-connector
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
# Cargo.toml declares the bench target: cargo reads the manifest's every target.
COPY benches benches
COPY src src
# The workspace's other member: cargo reads its manifest even when it is not built.
COPY fake fake
# --no-default-features: the image is for serving, so it leaves out the `demo`
# feature (the demo and fake-bitbucket commands, and the fake Bitbucket with its
# unauthenticated fault-injection API). `cargo run -- demo` from a checkout has it.
RUN cargo build --release --locked --no-default-features --bin bitbucket-connector \
 && strip target/release/bitbucket-connector

# distroless/cc: glibc and CA certificates, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/bitbucket-connector /usr/local/bin/bitbucket-connector
ENV BITBUCKET_CONNECTOR_CONFIG=/etc/bitbucket-connector/config.yaml
USER 65532:65532
EXPOSE 5557 5558
ENTRYPOINT ["/usr/local/bin/bitbucket-connector"]
CMD ["serve"]
