//! TLS for the HTTP API (`--tls-cert` / `--tls-key`): the rustls server configuration,
//! loaded and checked once at start (a file that cannot be read, holds no certificate or
//! key, or a key that does not match the certificate is a configuration error).
//!
//! The handshake runs inside the accept loop's connection task ([`super::accept`]), under
//! the header timeout, so a client that connects and never finishes it holds its slot no
//! longer than one that never finishes a request head.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The server configuration for a PEM certificate chain and its PEM private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let pem = std::fs::read(cert).map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--tls-cert {}: not a PEM certificate: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--tls-cert {}: no PEM certificate in the file",
            cert.display()
        ));
    }
    let pem = std::fs::read(key).map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!(
            "--tls-key {}: no PEM private key in the file ({e})",
            key.display()
        )
    })?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_no_client_auth()
    .with_single_cert(certs, key_der)
    .map_err(|e| {
        format!(
            "--tls-key {} does not go with --tls-cert {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Arc::new(cfg))
}
