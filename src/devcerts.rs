//! Throwaway certificates for development and tests: a CA, a server certificate
//! for localhost, and client certificates, made with rcgen (ECDSA P-256).
//!
//! These are for trying gridgate out and for tests. Production certificates
//! come from your own PKI.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct CertPair {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
}

/// A CA that can sign server and client certificates.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    key_pem: String,
}

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    /// rcgen could not make a key or certificate.
    #[error("generating a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A file or directory could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// Why writing failed.
        source: std::io::Error,
    },
    /// The file (named) exists and overwriting was not asked for.
    #[error("{0} already exists; pass --force to overwrite")]
    Exists(String),
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "gridgate development");
    dn.push(DnType::CommonName, cn);
    dn
}

impl DevCa {
    /// A new self-signed CA named `cn`.
    pub fn new(cn: &str) -> Result<DevCa, DevCertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let issuer = CertifiedIssuer::self_signed(params, key)?;
        Ok(DevCa { issuer, key_pem })
    }

    /// The CA certificate and key.
    pub fn pair(&self) -> CertPair {
        CertPair {
            cert_pem: self.issuer.pem(),
            key_pem: self.key_pem.clone(),
        }
    }

    fn issue(
        &self,
        cn: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<CertPair, DevCertError> {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name = dn(cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let issuer: &Issuer<'_, KeyPair> = &self.issuer;
        let cert = params.signed_by(&key, issuer)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for `localhost`, 127.0.0.1 and ::1, plus `extra` names.
    pub fn server(&self, extra: &[&str]) -> Result<CertPair, DevCertError> {
        let mut sans = vec!["localhost", "127.0.0.1", "::1"];
        sans.extend_from_slice(extra);
        self.issue("localhost", &sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `cn` and the given SANs (DNS
    /// names, IP addresses, or `URI:...` / `email:...` entries).
    pub fn client(&self, cn: &str, sans: &[&str]) -> Result<CertPair, DevCertError> {
        self.client_with_subject(dn(cn), sans)
    }

    /// A client certificate with this subject (its attributes in the
    /// certificate in the order they were pushed) and the given SANs, as for
    /// [`DevCa::client`].
    pub fn client_with_subject(
        &self,
        subject: DistinguishedName,
        sans: &[&str],
    ) -> Result<CertPair, DevCertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject;
        for san in sans {
            let entry = if let Some(uri) = san.strip_prefix("URI:") {
                SanType::URI(uri.try_into()?)
            } else if let Some(mail) = san.strip_prefix("email:") {
                SanType::Rfc822Name(mail.try_into()?)
            } else if let Ok(ip) = san.parse() {
                SanType::IpAddress(ip)
            } else {
                SanType::DnsName((*san).try_into()?)
            };
            params.subject_alt_names.push(entry);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let issuer: &Issuer<'_, KeyPair> = &self.issuer;
        let cert = params.signed_by(&key, issuer)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Files written by [`write_dev_certs`].
#[derive(Debug, Clone)]
pub struct DevCertFiles {
    /// `ca.crt`: the CA certificate clients and servers trust.
    pub ca_cert: PathBuf,
    /// `server.crt`: the server certificate for localhost.
    pub server_cert: PathBuf,
    /// `server.key`: its private key.
    pub server_key: PathBuf,
    /// (name, certificate, key) for each client.
    pub clients: Vec<(String, PathBuf, PathBuf)>,
}

/// Writes `ca.crt`, `ca.key`, `server.crt`, `server.key` and, for each client
/// name, `NAME.crt` / `NAME.key` into `dir`. Keys are written with mode 0600.
pub fn write_dev_certs(
    dir: &Path,
    clients: &[String],
    server_names: &[String],
    force: bool,
) -> Result<DevCertFiles, DevCertError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| DevCertError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut names = vec!["ca".to_string(), "server".to_string()];
    names.extend(clients.iter().cloned());
    if !force {
        for n in &names {
            for ext in ["crt", "key"] {
                let p = dir.join(format!("{n}.{ext}"));
                if p.exists() {
                    return Err(DevCertError::Exists(p.display().to_string()));
                }
            }
        }
    }
    let write = |name: &str, pair: &CertPair| -> Result<(PathBuf, PathBuf), DevCertError> {
        let crt = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&crt, &pair.cert_pem).map_err(io(&crt))?;
        write_private(&key, &pair.key_pem).map_err(io(&key))?;
        Ok((crt, key))
    };
    let ca = DevCa::new("gridgate development CA")?;
    let (ca_cert, _) = write("ca", &ca.pair())?;
    let extra: Vec<&str> = server_names.iter().map(String::as_str).collect();
    let (server_cert, server_key) = write("server", &ca.server(&extra)?)?;
    let mut out = Vec::new();
    for c in clients {
        let (crt, key) = write(c, &ca.client(c, &[])?)?;
        out.push((c.clone(), crt, key));
    }
    Ok(DevCertFiles {
        ca_cert,
        server_cert,
        server_key,
        clients: out,
    })
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}
