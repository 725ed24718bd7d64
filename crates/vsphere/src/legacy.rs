//! The opt-in legacy TLS path for vCenter 5.1 and ESXi 5.0/5.1, which speak only TLS 1.0 and
//! 1.1 (rustls refuses both): OpenSSL for those connections only, its security level lowered
//! only there, every connection reported loudly. Trust is the same as on the normal path: the
//! CA bundle with the host name checked, a pinned thumbprint (checked before a byte is sent),
//! or nothing.

use std::pin::Pin;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use crate::error::Error;
use crate::tls::{ServerTls, Trust};

/// An OpenSSL connector that accepts TLS 1.0 and up.
#[derive(Debug)]
pub(crate) struct Legacy {
    connector: SslConnector,
    trust: Trust,
}

fn tls_err(host: &str, e: impl std::fmt::Display) -> Error {
    Error::Tls { host: host.to_owned(), message: format!("legacy TLS: {e}") }
}

impl Legacy {
    pub(crate) fn new(trust: &Trust, host: &str) -> Result<Self, Error> {
        let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(|e| tls_err(host, e))?;
        b.set_min_proto_version(Some(SslVersion::TLS1)).map_err(|e| tls_err(host, e))?;
        // TLS 1.0 signs with SHA-1 and MD5, which OpenSSL 3 allows only at level 0.
        b.set_security_level(0);
        b.set_cipher_list("DEFAULT:@SECLEVEL=0").map_err(|e| tls_err(host, e))?;
        match trust {
            Trust::Verified { extra_ca } => {
                b.set_default_verify_paths().map_err(|e| tls_err(host, e))?;
                if let Some(ca) = extra_ca {
                    b.set_ca_file(ca).map_err(|e| tls_err(host, format!("the CA file {}: {e}", ca.display())))?;
                }
                b.set_verify(SslVerifyMode::PEER);
            }
            Trust::Pinned(_) | Trust::Insecure => b.set_verify(SslVerifyMode::NONE),
        }
        Ok(Self { connector: b.build(), trust: trust.clone() })
    }

    pub(crate) async fn connect(&self, host: &str, tcp: TcpStream) -> Result<(SslStream<TcpStream>, ServerTls), Error> {
        let name = host.trim_start_matches('[').trim_end_matches(']');
        let mut cfg = self.connector.configure().map_err(|e| tls_err(host, e))?;
        if !matches!(self.trust, Trust::Verified { .. }) {
            cfg.set_verify_hostname(false);
        }
        let ssl = cfg.into_ssl(name).map_err(|e| tls_err(host, e))?;
        let mut stream = SslStream::new(ssl, tcp).map_err(|e| tls_err(host, e))?;
        Pin::new(&mut stream).connect().await.map_err(|e| tls_err(host, e))?;
        let der = stream
            .ssl()
            .peer_certificate()
            .ok_or_else(|| tls_err(host, "the server sent no certificate"))?
            .to_der()
            .map_err(|e| tls_err(host, e))?;
        let seen = ServerTls::of(&der, stream.ssl().version_str().to_owned());
        match &self.trust {
            Trust::Pinned(t) => t.check(&der).map_err(|m| tls_err(host, m))?,
            Trust::Insecure => tracing::warn!("TLS verification is OFF for {host}"),
            _ => {}
        }
        tracing::warn!(
            "{host}: LEGACY {} with weak ciphers allowed (vSphere 5.x); upgrade the server when you can",
            seen.version
        );
        Ok((stream, seen))
    }
}
