//! Why the process could not start serving (or the demo could not run): one
//! line each on stderr, naming the file, key or address, as the contract asks.

use std::io;
use std::net::SocketAddr;

use crate::config::{ConfigErrors, ListenAddr};
use crate::tls::TlsError;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// Every problem of the config file (or of the TLS files it names).
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("grpc.addr: cannot listen on {addr}: {source}")]
    Listen { addr: ListenAddr, source: io::Error },
    #[error("telemetry.http: cannot listen on {addr}: {source}")]
    TelemetryListen { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Sealing(String),
    #[error("{0}")]
    Cache(String),
    #[error("connector {id:?}: {reason}")]
    Connector { id: String, reason: String },
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
    #[error("gRPC server task failed: {0}")]
    ServerTask(tokio::task::JoinError),
    #[error("cannot start the fake Bitbucket: {0}")]
    Fake(io::Error),
    #[error("the demo fixture has no OAuth client or admin credential")]
    DemoFixture,
    #[error("the fake's {0}")]
    DemoEndpoint(String),
    #[error("the server task failed: {0}")]
    DemoTask(tokio::task::JoinError),
    /// A step of `demo --walkthrough`, as it printed it.
    #[error("{0}")]
    Walkthrough(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_errors_name_the_key_and_the_address() {
        let source = || io::Error::from(io::ErrorKind::AddrInUse);
        let tcp = StartupError::Listen {
            addr: ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 5557))),
            source: source(),
        };
        assert!(tcp
            .to_string()
            .starts_with("grpc.addr: cannot listen on 127.0.0.1:5557: "));
        let unix = StartupError::Listen {
            addr: ListenAddr::Unix("/run/bbc.sock".into()),
            source: source(),
        };
        assert!(unix
            .to_string()
            .starts_with("grpc.addr: cannot listen on unix:/run/bbc.sock: "));
        let telemetry = StartupError::TelemetryListen {
            addr: SocketAddr::from(([127, 0, 0, 1], 5558)),
            source: source(),
        };
        assert!(telemetry
            .to_string()
            .starts_with("telemetry.http: cannot listen on 127.0.0.1:5558: "));
    }

    #[test]
    fn config_problems_keep_their_lines() {
        let e = StartupError::from(ConfigErrors(vec!["a.b: x".into(), "c: y".into()]));
        assert_eq!(e.to_string(), "a.b: x\nc: y");
        let e = StartupError::Connector {
            id: "bb".into(),
            reason: "no client".into(),
        };
        assert_eq!(e.to_string(), "connector \"bb\": no client");
    }
}
