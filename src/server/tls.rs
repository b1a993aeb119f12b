//! TLS for the listening channels: rustls server configs from PEM files, client
//! certificate verification against a configured CA, and the identity a
//! verified client certificate carries.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;
use crate::gate::identity::PeerCertificate;

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

/// A channel's TLS settings that can be replaced while it serves: a reload
/// (SIGHUP, or a change of the certificate, key or client CA file) builds a
/// new rustls config from the files; new handshakes use it, connections
/// already open keep theirs. A config that does not load (a half-written
/// file, a key that does not match) is logged and the previous one kept.
pub struct LiveTls {
    settings: TlsConfig,
    current: std::sync::RwLock<Arc<ServerConfig>>,
    stamp: std::sync::Mutex<Vec<Option<(std::time::SystemTime, u64)>>>,
}

impl LiveTls {
    /// Loads the files; an error here refuses to start.
    pub fn load(settings: &TlsConfig) -> Result<Arc<LiveTls>, TlsError> {
        let config = server_config(settings)?;
        let live = LiveTls {
            settings: settings.clone(),
            current: std::sync::RwLock::new(config),
            stamp: std::sync::Mutex::new(Vec::new()),
        };
        let stamp = live.files_stamp();
        *live
            .stamp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = stamp;
        Ok(Arc::new(live))
    }

    /// The config for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.settings.cert.as_path(), self.settings.key.as_path()];
        files.extend(self.settings.client_ca.as_deref());
        files
    }

    fn files_stamp(&self) -> Vec<Option<(std::time::SystemTime, u64)>> {
        self.files()
            .iter()
            .map(|p| {
                let m = std::fs::metadata(p).ok()?;
                Some((m.modified().ok()?, m.len()))
            })
            .collect()
    }

    /// Whether a file changed since the last load attempt.
    pub fn changed(&self) -> bool {
        let now = self.files_stamp();
        let mut last = self
            .stamp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *last == now {
            return false;
        }
        *last = now;
        true
    }

    /// Loads the files again; on success new handshakes use them.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.settings)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
        Ok(())
    }

    /// The certificate file, for logs.
    pub fn cert_path(&self) -> &Path {
        &self.settings.cert
    }
}

/// Reloads every channel's TLS files on SIGHUP and, polling every `poll`,
/// when one of them changes; until the task is aborted.
pub fn spawn_reloader(
    channels: Vec<(String, Arc<LiveTls>)>,
    poll: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use crate::gate::reload::{Trigger, Triggers};
        let mut triggers = Triggers::new(Some(poll));
        loop {
            let trigger = triggers.next().await;
            for (address, live) in &channels {
                // `changed` also records the files' state for the next poll.
                if !live.changed() && trigger == Trigger::Poll {
                    continue;
                }
                let trigger = trigger.as_str();
                match live.reload() {
                    Ok(()) => tracing::info!(
                        channel = %address,
                        cert = %live.cert_path().display(),
                        trigger,
                        "TLS certificate reloaded: new handshakes use it"
                    ),
                    Err(e) => tracing::error!(
                        channel = %address,
                        trigger,
                        "TLS reload failed; keeping the previous certificate: {e}"
                    ),
                }
            }
        }
    })
}
