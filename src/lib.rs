//! bitbucket-connector: dex's `bitbucket-cloud` connector as a gRPC service.
//!
//! Where things happen:
//! - `bitbucket`: the only code that speaks HTTP to Bitbucket Cloud;
//! - `connector`: the domain, where an identity is decided (no gRPC, no HTTP);
//! - `grpc`: proto <-> domain, and the one place errors become `tonic::Status`;
//! - [`server`]: the tonic server, health, reflection, auth, limits, shutdown;
//! - [`sealing`]: connector data sealed with the operator's keys;
//! - [`config`]: the YAML file -> a validated [`config::Config`]; [`startup`]: why startup failed;
//! - `walkthrough` and `cli::demo` (feature `demo`, on by default): the demo
//!   against the fake Bitbucket of the `fake-bitbucket` crate (`fake/`).
#![warn(unreachable_pub)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod bitbucket;
mod cache;
pub mod cli;
pub mod config;
mod connections;
mod connector;
mod grpc;
mod metrics;
pub mod sealing;
pub mod secret;
pub mod server;
pub mod startup;
mod telemetry;
mod tls;
#[cfg(feature = "demo")]
mod walkthrough;

/// Installs ring as the process's TLS provider, shared by reqwest and tonic
/// (reqwest is built without one of its own). Idempotent; call it before any TLS.
pub fn install_crypto() {
    bitbucket::install_crypto();
}

/// The generated protobuf and gRPC code, fenced off from the rest.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("connector.v1");

    /// The descriptor set served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("connector_descriptor");

    impl std::fmt::Debug for Identity {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Identity")
                .field("user_id", &self.user_id)
                .field("username", &self.username)
                .field("preferred_username", &self.preferred_username)
                .field("email", &self.email)
                .field("email_verified", &self.email_verified)
                .field("groups", &self.groups)
                .field(
                    "connector_data",
                    &format_args!("[{} bytes redacted]", self.connector_data.len()),
                )
                .finish()
        }
    }
}

/// Cases per property test: `PROPTEST_CASES` when set, else `default`.
#[cfg(test)]
pub(crate) fn fuzz_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
