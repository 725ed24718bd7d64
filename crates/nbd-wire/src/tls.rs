//! TLS for the NBD server: a rustls server configuration from PEM files (a certificate chain
//! and its key, and optionally a CA whose client certificates are then required), with the
//! workspace's one crypto provider (aws-lc-rs). Errors name files, never their contents.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The largest PEM file read: certificate chains and keys are a few KiB, and a wrong path such
/// as `/dev/zero` must not fill the memory.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Why a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        /// Which file (certificate, key, client CA).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds nothing usable of what it should (no certificate, no key, larger than
    /// 1 MiB); its contents are never quoted.
    #[error("the {what} {} holds no usable {expected}", path.display())]
    Empty {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What was looked for in it.
        expected: &'static str,
    },
    /// rustls refused the combination (a key that does not match the certificate, a client
    /// CA it cannot use).
    #[error("TLS configuration refused: {0}")]
    Refused(String),
}

/// The bytes of a PEM file, read with a bound.
fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let read = |source| TlsError::Read { what, path: path.to_owned(), source };
    let mut bytes = Vec::new();
    std::fs::File::open(path).map_err(read)?.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes).map_err(read)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::Empty { what, path: path.to_owned(), expected: "PEM of at most 1 MiB" });
    }
    Ok(bytes)
}

/// The certificates of a PEM file (at least one).
fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path, what)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.to_owned(), expected: "certificate" });
    }
    Ok(certs)
}

/// A server configuration presenting the chain in `cert` with the private key in `key` (PEM:
/// PKCS#8, PKCS#1 or SEC1). With `client_ca`, clients must present a certificate signed by one
/// of the CAs in that file.
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = certificates(cert, "certificate")?;
    let key_pem = read_pem(key, "key")?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::Empty {
        what: "key",
        path: key.to_owned(),
        expected: "private key",
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Refused(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates(ca, "client CA")? {
                roots.add(c).map_err(|e| TlsError::Refused(format!("client CA {}: {e}", ca.display())))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Refused(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    // rustls's messages about a mismatched key name no key material.
    let config = builder.with_single_cert(chain, key_der).map_err(|e| TlsError::Refused(e.to_string()))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named_and_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let pki = testkit::pki::TestPki::create(dir.path());
        let other_dir = tempfile::tempdir().unwrap();
        let other = testkit::pki::TestPki::create(other_dir.path());
        assert!(server_config(&pki.cert, &pki.key, None).is_ok());
        assert!(server_config(&pki.cert, &pki.key, Some(&pki.ca)).is_ok());
        let missing = dir.path().join("missing.pem");
        assert!(matches!(server_config(&missing, &pki.key, None), Err(TlsError::Read { what: "certificate", .. })));
        // A key where the certificate should be, and the other way round.
        let e = server_config(&pki.key, &pki.key, None).unwrap_err();
        assert!(matches!(e, TlsError::Empty { what: "certificate", .. }), "{e}");
        let e = server_config(&pki.cert, &pki.cert, None).unwrap_err();
        assert!(matches!(e, TlsError::Empty { what: "key", .. }), "{e}");
        let e = server_config(&pki.cert, &pki.key, Some(&pki.key)).unwrap_err();
        assert!(matches!(e, TlsError::Empty { what: "client CA", .. }), "{e}");
        // Another certificate's key: refused, and the message holds no key material.
        let e = server_config(&pki.cert, &other.key, None).unwrap_err();
        assert!(matches!(e, TlsError::Refused(_)), "{e}");
        let key_text = std::fs::read_to_string(&other.key).unwrap();
        let body = key_text.lines().nth(1).unwrap();
        assert!(!e.to_string().contains(body) && !e.to_string().contains("PRIVATE KEY"), "{e}");
    }
}
