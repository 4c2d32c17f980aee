//! TLS and mutual TLS for the gRPC port, with certificates re-read on SIGHUP
//! or when the files change, without dropping the server or its connections.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Why the TLS material cannot be used; each names the config key and file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read certificates from {}: {source}", path.display())]
    ReadCerts {
        key: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{key}: no PEM certificate in {}", path.display())]
    NoCertificate { key: &'static str, path: PathBuf },
    #[error("grpc.tlsKey: cannot read a private key from {}: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("grpc.tlsClientCA: {}: {source}", path.display())]
    ClientCa {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("grpc.tlsKey: does not match grpc.tlsCert or is unusable: {0}")]
    KeyMismatch(rustls::Error),
    #[error("TLS: {0}")]
    Rustls(rustls::Error),
}

/// How often the files' modification times are looked at.
const POLL_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub(crate) struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The current server TLS config; new connections use the latest one.
pub(crate) struct ReloadableTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

impl ReloadableTls {
    pub(crate) fn load(files: TlsFiles) -> Result<ReloadableTls, TlsError> {
        let config = build(&files)?;
        Ok(ReloadableTls {
            stamps: Mutex::new(stamps(&files)),
            files,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Re-reads the files; on error the previous config stays in use.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) = stamps(&self.files);
        Ok(())
    }

    fn changed(&self) -> bool {
        let now = stamps(&self.files);
        *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) != now
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    /// Reloads, logging the outcome; `trigger` says why.
    pub(crate) fn reload_logged(&self, trigger: &str) {
        match self.reload() {
            Ok(()) => tracing::info!(trigger, "TLS certificates reloaded"),
            Err(e) => {
                tracing::error!(trigger, error = %e, "TLS reload failed; the previous certificates stay in use")
            }
        }
    }

    /// Reloads when a file's modification time changes (SIGHUP is handled
    /// by the server, which calls `reload_logged`).
    pub(crate) async fn watch(self: Arc<Self>) {
        loop {
            tokio::time::sleep(POLL_EVERY).await;
            if self.changed() {
                self.reload_logged("files changed");
            }
        }
    }
}

fn stamps(files: &TlsFiles) -> Vec<Option<SystemTime>> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    .collect()
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCerts {
            key,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("grpc.tlsCert", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::ReadKey {
        path: files.key.clone(),
        source,
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let ca_error = |e: Box<dyn std::error::Error + Send + Sync>| TlsError::ClientCa {
                path: ca.clone(),
                source: e,
            };
            let mut roots = RootCertStore::empty();
            for c in read_certs("grpc.tlsClientCA", ca)? {
                roots.add(c).map_err(|e| ca_error(e.into()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ca_error(e.into()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(TlsError::KeyMismatch)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cert_file_without_pem_names_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("tls.crt");
        std::fs::write(&cert, "not a certificate\n").unwrap();
        let files = TlsFiles {
            cert: cert.clone(),
            key: dir.path().join("tls.key"),
            client_ca: None,
        };
        let Err(e) = ReloadableTls::load(files) else {
            panic!("loaded a certificate from text");
        };
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("grpc.tlsCert: no PEM certificate in {}", cert.display())
        );
    }
}
