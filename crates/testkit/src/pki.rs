//! A throwaway certificate authority and a server and a client certificate it signs, for TLS
//! tests (vcsim's built-in certificate is RSA-1024, which rustls rightly refuses).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA, one server certificate for `127.0.0.1` and `localhost` and one client certificate,
/// written as PEM files.
#[derive(Debug)]
pub struct TestPki {
    /// The CA certificate (PEM): trust it to verify the server.
    pub ca: PathBuf,
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
    /// The server certificate's DER bytes, to compute thumbprints from.
    pub cert_der: Vec<u8>,
    /// A client certificate (PEM), for TLS client authentication.
    pub client_cert: PathBuf,
    /// The client's private key (PEM).
    pub client_key: PathBuf,
}

impl TestPki {
    /// Makes the files in `dir`.
    pub fn create(dir: &Path) -> Self {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "syncproxy test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");
        let key = KeyPair::generate().expect("server key");
        let params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).expect("server params");
        let cert = params.signed_by(&key, &ca).expect("server certificate");
        let client_key = KeyPair::generate().expect("client key");
        let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        client_params.distinguished_name.push(rcgen::DnType::CommonName, "syncproxy test client");
        client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params.signed_by(&client_key, &ca).expect("client certificate");
        let pki = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            cert_der: cert.der().to_vec(),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        std::fs::write(&pki.ca, ca.pem()).expect("writing ca.pem");
        std::fs::write(&pki.cert, cert.pem()).expect("writing server.pem");
        std::fs::write(&pki.key, key.serialize_pem()).expect("writing server.key");
        std::fs::write(&pki.client_cert, client.pem()).expect("writing client.pem");
        std::fs::write(&pki.client_key, client_key.serialize_pem()).expect("writing client.key");
        pki
    }
}
