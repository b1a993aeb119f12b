//! TLS for the listening channels: rustls server configs from PEM files, client
//! certificate verification against a configured CA, and the identity a
//! verified client certificate carries.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;
use crate::gate::identity::PeerCertificate;
use crate::live::{Live, Source};

mod subject;

/// Why a channel's TLS settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    /// rustls refused the combination (e.g. key does not match certificate).
    #[error("{0}")]
    Rustls(String),
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Reads every certificate in a PEM file; an empty file is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|e| file_err(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// Reads the private key from a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|e| file_err(path, e))?;
    PrivateKeyDer::from_pem_slice(&data)
        .map_err(|e| file_err(path, format!("no usable PEM private key: {e}")))
}

/// The crypto provider gridgate uses everywhere (aws-lc-rs).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds the rustls server config for one channel, offering HTTP/2 only.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(&tls.cert)?;
    let key = load_key(&tls.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| file_err(ca, format!("not a usable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| file_err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Rustls(format!(
            "{} and {}: {e}",
            tls.cert.display(),
            tls.key.display()
        ))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Reads the identity fields of a (verified) client certificate: the subject
/// in RFC 4514 form (see [`subject`]), the first common name, the SANs.
pub fn peer_certificate(der: &CertificateDer<'_>) -> Option<PeerCertificate> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let name = cert.subject();
    let mut out = PeerCertificate {
        subject: subject::rfc4514(name)?,
        common_name: name
            .iter_common_name()
            .next()
            .and_then(|cn| subject::string_value(cn.attr_value())),
        ..PeerCertificate::default()
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => out.dns_names.push(d.to_string()),
                GeneralName::URI(u) => out.uris.push(u.to_string()),
                GeneralName::RFC822Name(e) => out.emails.push(e.to_string()),
                GeneralName::IPAddress(ip) => {
                    let text = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip)
                            .map(|b| std::net::IpAddr::from(b).to_string())
                            .ok(),
                        16 => <[u8; 16]>::try_from(*ip)
                            .map(|b| std::net::IpAddr::from(b).to_string())
                            .ok(),
                        _ => None,
                    };
                    out.ips.extend(text);
                }
                _ => {}
            }
        }
    }
    Some(out)
}

/// A channel's TLS files: the certificate, its key and the client CA. As a
/// [`Live`] value (see [`crate::live`]) a reload (SIGHUP, or a change of one
/// of the files) builds a new rustls config; new handshakes use it,
/// connections already open keep theirs. A config that does not load (a
/// half-written file, a key that does not match) is logged and the previous
/// one kept.
pub struct TlsFiles(TlsConfig);

impl Source for TlsFiles {
    type Value = ServerConfig;
    type Error = TlsError;
    const WHAT: &'static str = "TLS";
    const RELOADED: &'static str = "TLS certificate reloaded: new handshakes use it";
    const FAILED: &'static str = "TLS reload failed; keeping the previous certificate";

    fn load(&self) -> Result<ServerConfig, TlsError> {
        server_config(&self.0).map(Arc::unwrap_or_clone)
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.0.cert.clone(), self.0.key.clone()];
        files.extend(self.0.client_ca.clone());
        files
    }

    fn version(&self, _: &ServerConfig) -> String {
        self.0.cert.display().to_string()
    }
}

/// A channel's TLS settings, replaceable while it serves.
pub type LiveTls = Live<TlsFiles>;

/// Loads a channel's TLS files (an error here refuses to start); `name` is
/// the channel's address, for log lines.
pub fn load(settings: &TlsConfig, name: &str) -> Result<Arc<LiveTls>, TlsError> {
    Live::load(TlsFiles(settings.clone()), name, true)
}
