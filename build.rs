//! Generates the gRPC code and the descriptor set served by reflection.
//! protoc comes from the `protox` crate (pure Rust), never from the system.
use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/connector/v1/connector.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("connector_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Identity carries connector_data, which may hold dex plaintext tokens:
        // its Debug is written by hand (src/lib.rs, module `pb`) and redacts them.
        .skip_debug(["connector.v1.Identity"])
        .compile_fds(fds)?;
    Ok(())
}
