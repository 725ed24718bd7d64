//! TLS trust for vCenter and ESXi: the CA bundle by default, a pinned SHA-256 or SHA-1
//! thumbprint, or an explicit insecure mode that warns on every connection. One rustls crypto
//! provider (aws-lc-rs) for the whole workspace.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha1::Digest as _;

use crate::error::Error;

/// The one crypto provider of the workspace (aws-lc-rs: `object_store`'s S3 client brings it
/// too, so there is never a second one).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs [`provider`] as the process default. Every binary and test calls this first, so a
/// crate that asks rustls for "the default" never finds two and panics.
pub fn install_crypto_provider() {
    // Already installed (by an earlier call) is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A certificate thumbprint: a hash of the server's end-entity certificate (DER).
#[derive(Clone, PartialEq, Eq)]
pub enum Thumbprint {
    /// SHA-1, as VMware prints it (`AA:BB:...`, 20 bytes).
    Sha1([u8; 20]),
    /// SHA-256 (32 bytes).
    Sha256([u8; 32]),
}

impl Thumbprint {
    /// Parses hex with or without colons; the length says which hash it is.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let hex: String = s.trim().chars().filter(|c| *c != ':' && *c != '-' && *c != ' ').collect();
        let bytes = hex::decode(&hex)
            .map_err(|_| Error::Config(format!("thumbprint {s:?} is not hexadecimal (AA:BB:... or AABB...)")))?;
        match bytes.len() {
            20 => Ok(Self::Sha1(bytes.try_into().unwrap_or([0; 20]))),
            32 => Ok(Self::Sha256(bytes.try_into().unwrap_or([0; 32]))),
            n => Err(Error::Config(format!(
                "thumbprint {s:?} has {n} bytes; SHA-1 thumbprints have 20 and SHA-256 ones 32"
            ))),
        }
    }

    /// Checks that `cert` has this thumbprint; the refusal names the one it has (in the same
    /// hash), so an operator can tell a re-issued certificate from an attack.
    pub fn check(&self, cert: &[u8]) -> Result<(), String> {
        if self.matches(cert) {
            return Ok(());
        }
        let seen = ServerTls::of(cert, String::new());
        let seen = if matches!(self, Self::Sha1(_)) { seen.sha1 } else { seen.sha256 };
        Err(format!("the server's certificate has thumbprint {seen}, not the pinned {self}"))
    }

    /// The SHA-256 thumbprint of a certificate (DER): what to pin for a server whose
    /// certificate one holds (the embedded simulator's, a host's from vCenter).
    pub fn sha256_of(cert: &[u8]) -> Self {
        Self::Sha256(sha2::Sha256::digest(cert).into())
    }

    /// Whether `cert` has this thumbprint.
    pub fn matches(&self, cert: &[u8]) -> bool {
        match self {
            Self::Sha1(t) => sha1::Sha1::digest(cert).as_slice() == t,
            Self::Sha256(t) => sha2::Sha256::digest(cert).as_slice() == t,
        }
    }
}

impl fmt::Display for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b: &[u8] = match self {
            Self::Sha1(b) => b,
            Self::Sha256(b) => b,
        };
        let s: Vec<String> = b.iter().map(|x| format!("{x:02X}")).collect();
        f.write_str(&s.join(":"))
    }
}

impl fmt::Debug for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Thumbprint({self})")
    }
}

/// How a server's certificate is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Verified against the system's CA bundle, plus an extra CA file (PEM) if given, with the
    /// host name checked.
    Verified {
        /// More trust anchors (a private CA).
        extra_ca: Option<PathBuf>,
    },
    /// The end-entity certificate must have this thumbprint (the host name is not checked:
    /// the pin is stronger). This is how ESXi hosts are trusted when vCenter vouches for them.
    Pinned(Thumbprint),
    /// Anything is accepted. Every connection logs a warning.
    Insecure,
}

impl Default for Trust {
    fn default() -> Self {
        Self::Verified { extra_ca: None }
    }
}

/// What the client saw of a server's TLS: shown by `probe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// SHA-1 thumbprint of the end-entity certificate.
    pub sha1: Thumbprint,
    /// SHA-256 thumbprint.
    pub sha256: Thumbprint,
    /// The negotiated protocol (`TLSv1_3`).
    pub version: String,
}

impl ServerTls {
    pub(crate) fn of(cert: &[u8], version: String) -> Self {
        Self {
            sha1: Thumbprint::Sha1(sha1::Sha1::digest(cert).into()),
            sha256: Thumbprint::Sha256(sha2::Sha256::digest(cert).into()),
            version,
        }
    }
}

/// Builds the rustls configuration for `trust`.
pub fn client_config(trust: &Trust) -> Result<rustls::ClientConfig, Error> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Config(format!("TLS setup: {e}")))?;
    let config = match trust {
        Trust::Verified { extra_ca } => {
            let mut roots = rustls::RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            for c in native.certs {
                let _ = roots.add(c);
            }
            if let Some(path) = extra_ca {
                let pem = std::fs::read(path)
                    .map_err(|e| Error::Config(format!("reading the CA file {}: {e}", path.display())))?;
                let mut added = 0;
                for c in pem_certificates(&pem) {
                    roots.add(c).map_err(|e| Error::Config(format!("the CA file {}: {e}", path.display())))?;
                    added += 1;
                }
                if added == 0 {
                    return Err(Error::Config(format!("the CA file {} holds no PEM certificate", path.display())));
                }
            }
            if roots.is_empty() {
                return Err(Error::Config(
                    "no trusted CA certificates: install ca-certificates, give a CA file, or pin the server's thumbprint"
                        .into(),
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Pinned(t) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Custom { pin: Some(t.clone()), provider }))
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Custom { pin: None, provider }))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// The certificates in a PEM file.
fn pem_certificates(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem).filter_map(Result::ok).collect()
}

/// The server name rustls is given (an IP address works too).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, Error> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(h.to_owned()).map_err(|_| Error::Config(format!("{host:?} is not a valid host name")))
}

/// The verifier for [`Trust::Pinned`] and [`Trust::Insecure`]: the certificate is checked
/// against the pin (or not at all), and the handshake's signatures are always verified, so the
/// server must hold the certificate's key.
#[derive(Debug)]
struct Custom {
    pin: Option<Thumbprint>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Custom {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(want) = &self.pin else {
            tracing::warn!(
                "TLS verification is OFF for {}: anyone on the path can read the credentials and the disks",
                server_name.to_str()
            );
            return Ok(ServerCertVerified::assertion());
        };
        want.check(end_entity).map(|()| ServerCertVerified::assertion()).map_err(rustls::Error::General)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// What a server's certificate says, read on a first contact to help decide whether to trust
/// it: as ssh shows a new host's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// SHA-256 thumbprint (what `--thumbprint` pins best).
    pub sha256: Thumbprint,
    /// SHA-1 thumbprint (what vSphere's own screens show).
    pub sha1: Thumbprint,
    /// The subject (`CN=esx1.example.net, O=VMware`), when the certificate parses.
    pub subject: Option<String>,
    /// The issuer.
    pub issuer: Option<String>,
    /// Valid from and until (`2026-01-01 00:00:00 +00:00`).
    pub validity: Option<(String, String)>,
    /// The RSA key's size in bits, for an RSA key.
    pub rsa_bits: Option<usize>,
}

impl CertFacts {
    /// Reads what the certificate `der` says; the thumbprints always, the rest when it parses.
    pub fn of(der: &[u8]) -> Self {
        let mut facts = Self {
            sha256: Thumbprint::Sha256(sha2::Sha256::digest(der).into()),
            sha1: Thumbprint::Sha1(sha1::Sha1::digest(der).into()),
            subject: None,
            issuer: None,
            validity: None,
            rsa_bits: None,
        };
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
            facts.subject = Some(cert.subject().to_string());
            facts.issuer = Some(cert.issuer().to_string());
            let v = cert.validity();
            facts.validity = Some((v.not_before.to_string(), v.not_after.to_string()));
            if let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = cert.public_key().parsed() {
                facts.rsa_bits = Some(rsa.key_size());
            }
        }
        facts
    }

    /// The facts as lines for an operator, ending with the flag that pins the certificate.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        if let Some(s) = &self.subject {
            out.push_str(&format!("\n  subject:  {s}"));
        }
        if let Some(i) = &self.issuer {
            out.push_str(&format!("\n  issuer:   {i}"));
        }
        if let Some((from, until)) = &self.validity {
            out.push_str(&format!("\n  valid:    {from} to {until}"));
        }
        out.push_str(&format!("\n  SHA-256:  {}\n  SHA-1:    {}", self.sha256, self.sha1));
        if let Some(bits) = self.rsa_bits.filter(|b| *b < 2048) {
            out.push_str(&format!(
                "\nIts key is RSA {bits} bits: too weak for TLS here, pinned or not. Give the host a certificate with a \
                 key of 2048 bits or more (on ESXi: /sbin/generate-certificates, then restart hostd)."
            ));
        } else {
            out.push_str(&format!(
                "\nIf this is the server you mean (compare the thumbprint with its console), trust it with\n  \
                 --thumbprint {}\nor give its CA with --ca-file.",
                self.sha256
            ));
        }
        out
    }
}

/// Connects to `host:port` only to read the certificate it presents (the handshake is broken
/// off once it is seen); `None` when it presents none or cannot be reached within `timeout`.
pub async fn first_contact(host: &str, port: u16, timeout: std::time::Duration) -> Option<CertFacts> {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Capture { seen: seen.clone(), provider }))
        .with_no_client_auth();
    let name = server_name(host).ok()?;
    let contact = async {
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port)).await.ok()?;
        let _ = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await;
        Some(())
    };
    tokio::time::timeout(timeout, contact).await.ok().flatten()?;
    let der: Option<Vec<u8>> = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    der.map(|d| CertFacts::of(&d))
}

/// A verifier that records the server's certificate and refuses it: for [`first_contact`].
#[derive(Debug)]
struct Capture {
    seen: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(end_entity.to_vec());
        Err(rustls::Error::General("certificate read; contact ends here".into()))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("not used".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A rustls certificate error in plain words.
pub fn plain_reason(message: &str) -> &'static str {
    if message.contains("CaUsedAsEndEntity") {
        "the server presents a CA certificate as its own (a self-signed host certificate)"
    } else if message.contains("UnknownIssuer") {
        "it is signed by a CA this machine does not trust"
    } else if message.contains("Expired") {
        "it has expired"
    } else if message.contains("NotValidYet") {
        "it is not valid yet (check both clocks)"
    } else if message.contains("NotValidForName") {
        "it was issued for another name than the one connected to"
    } else if message.contains("BadSignature") || message.contains("UnsupportedSignatureAlgorithm") {
        "its key or signature is too weak or of a kind TLS here does not accept"
    } else {
        "it could not be verified"
    }
}

#[cfg(test)]
mod tests {

    /// A self-signed certificate with an RSA key of `bits`, made with OpenSSL.
    fn rsa_cert(bits: u32) -> Vec<u8> {
        use openssl::{asn1::Asn1Time, hash::MessageDigest, pkey::PKey, rsa::Rsa, x509};
        let key = PKey::from_rsa(Rsa::generate(bits).unwrap()).unwrap();
        let mut name = x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "esx-old.example").unwrap();
        let name = name.build();
        let mut b = x509::X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(30).unwrap()).unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        b.build().to_der().unwrap()
    }

    #[test]
    fn a_first_contact_shows_the_certificate_and_the_flag_or_says_the_key_is_too_weak() {
        let der = rsa_cert(2048);
        let facts = CertFacts::of(&der);
        assert_eq!(facts.sha256, Thumbprint::sha256_of(&der));
        assert_eq!(facts.rsa_bits, Some(2048));
        let text = facts.explain();
        assert!(text.contains("CN=esx-old.example") && text.contains("valid:"), "{text}");
        assert!(text.contains(&format!("--thumbprint {}", facts.sha256)), "{text}");

        let weak = CertFacts::of(&rsa_cert(1024)).explain();
        assert!(weak.contains("RSA 1024 bits: too weak") && !weak.contains("--thumbprint"), "{weak}");
        // Garbage still gets its thumbprints.
        let junk = CertFacts::of(b"not a certificate");
        assert!(junk.subject.is_none() && junk.explain().contains("SHA-256"));
        assert!(plain_reason("invalid peer certificate: UnknownIssuer").contains("CA this machine"));
    }

    use super::*;

    #[test]
    fn thumbprints_parse_in_vmware_and_plain_forms() {
        let sha1 = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01";
        let t = Thumbprint::parse(sha1).unwrap();
        assert!(matches!(t, Thumbprint::Sha1(_)));
        assert_eq!(t.to_string(), sha1);
        assert_eq!(Thumbprint::parse(&sha1.replace(':', "").to_lowercase()).unwrap(), t);
        assert!(matches!(Thumbprint::parse(&"00".repeat(32)).unwrap(), Thumbprint::Sha256(_)));
        assert!(Thumbprint::parse("AB:CD").unwrap_err().to_string().contains("2 bytes"));
        assert!(Thumbprint::parse("zz").is_err());
    }

    #[test]
    fn thumbprints_match_their_certificate_only() {
        let der = b"not really a certificate, but bytes are bytes";
        let seen = ServerTls::of(der, "TLSv1_3".into());
        assert!(seen.sha1.matches(der) && seen.sha256.matches(der));
        assert!(!seen.sha256.matches(b"another"));
    }
}
