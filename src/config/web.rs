//! `web:`: the listener for the invocation pages, search, sign-in and the
//! JSON API. Off when the section is absent.
//!
//! ```yaml
//! web:
//!   address: "0.0.0.0:8443"          # or unix:/run/gridgate-web.sock
//!   insecure-mode: false             # TLS with the same keys as a server: channel
//!   credentials:
//!     tls-server-key: web.key
//!     tls-server-cert: web.crt
//!     tls-client-certs: company-ca.crt   # browsers with a company certificate
//!   client-certificates: optional    # or required (the default with a CA)
//!   public-url: "https://gate.example"   # Bazel: --bes_results_url=<public-url>/invocation/
//!   session-key-file: web-session.key    # 32 bytes or more of random data
//!   oidc:
//!     issuer: "https://login.example"
//!     client-id: gridgate
//!     client-secret-file: oidc-client.secret
//!     scopes: [openid, email, profile]
//!     claims: { actor: [email, sub], subject: [sub], workflow: [aud] }
//! ```

use super::model::*;
use super::raw::*;
use super::validate::*;
use super::ConfigError;

/// The shortest session key file accepted (bytes).
const MIN_SESSION_KEY: usize = 32;

impl Validator {
    pub(super) fn web(
        &self,
        w: Option<&RawWeb>,
        method: AuthMethod,
    ) -> Result<Option<WebConfig>, ConfigError> {
        let Some(w) = w else {
            return Ok(None);
        };
        let channel = RawChannel {
            address: w.address.clone(),
            port: None,
            insecure_mode: w.insecure_mode,
            credentials: w.credentials.clone(),
            allow_open: w.allow_open,
        };
        let c = self.channel("web", &channel)?;
        if method == AuthMethod::None && !c.listen.is_local() && !c.allow_open {
            return Err(self.err(
                "web.address",
                &format!(
                    "{} is reachable from other machines but authorization is `none`: every \
                     build would be visible to anyone; configure authorization, or set \
                     `allow-open: true` to serve open pages on purpose",
                    c.address
                ),
            ));
        }
        let client_certificates = match (w.client_certificates.as_deref(), &c.tls) {
            (None, Some(t)) if t.client_ca.is_some() => ClientCertificates::Required,
            (None, _) => ClientCertificates::Off,
            (Some(_), None)
            | (
                Some(_),
                Some(TlsConfig {
                    client_ca: None, ..
                }),
            ) => {
                return Err(self.err(
                    "web.client-certificates",
                    "needs credentials.tls-client-certs (the CA client certificates chain to)",
                ))
            }
            (Some("required"), _) => ClientCertificates::Required,
            (Some("optional"), _) => ClientCertificates::Optional,
            (Some(other), _) => {
                return Err(self.err(
                    "web.client-certificates",
                    &format!("unknown value {other:?} (expected required or optional)"),
                ))
            }
        };
        let public_url = match &w.public_url {
            None => None,
            Some(u) => Some(self.public_url(u)?),
        };
        let session_key = match &w.session_key_file {
            None => None,
            Some(p) => {
                let key = "web.session-key-file";
                let path = self.readable_file(key, p)?;
                let bytes = std::fs::read(&path)
                    .map_err(|e| self.err(key, &format!("cannot read {}: {e}", path.display())))?;
                let trimmed = bytes.trim_ascii();
                if trimmed.len() < MIN_SESSION_KEY {
                    return Err(self.err(
                        key,
                        &format!(
                            "{} holds {} bytes; at least {MIN_SESSION_KEY} random bytes are needed \
                             (e.g. `head -c 48 /dev/urandom | base64 > {}`)",
                            path.display(),
                            trimmed.len(),
                            path.display()
                        ),
                    ));
                }
                Some(SessionKey(trimmed.to_vec()))
            }
        };
        let oidc = match &w.oidc {
            None => None,
            Some(o) => Some(self.oidc(o)?),
        };
        if oidc.is_some() {
            if public_url.is_none() {
                return Err(self.err(
                    "web.public-url",
                    "missing: OpenID Connect sign-in needs it for its redirect URI \
                     (<public-url>/auth/callback)",
                ));
            }
            if session_key.is_none() {
                return Err(self.err(
                    "web.session-key-file",
                    "missing: OpenID Connect sessions are cookies sealed with this key",
                ));
            }
        }
        Ok(Some(WebConfig {
            address: c.address,
            listen: c.listen,
            tls: c.tls,
            client_certificates,
            public_url,
            session_key,
            oidc,
        }))
    }

    fn public_url(&self, u: &str) -> Result<String, ConfigError> {
        let key = "web.public-url";
        let rest = u
            .strip_prefix("https://")
            .or_else(|| u.strip_prefix("http://"))
            .ok_or_else(|| self.err(key, &format!("{u:?} is not an http:// or https:// URL")))?;
        if rest.is_empty() || rest.starts_with('/') || u.contains(['?', '#', ' ']) {
            return Err(self.err(
                key,
                &format!("{u:?} is not a base URL (scheme, host, optional path)"),
            ));
        }
        Ok(u.trim_end_matches('/').to_string())
    }

    fn oidc(&self, o: &RawOidc) -> Result<OidcConfig, ConfigError> {
        let issuer = o.issuer.trim_end_matches('/').to_string();
        if !(issuer.starts_with("https://") || issuer.starts_with("http://")) {
            return Err(self.err(
                "web.oidc.issuer",
                &format!("{:?} is not an http(s) URL", o.issuer),
            ));
        }
        if o.client_id.is_empty() {
            return Err(self.err("web.oidc.client-id", "is empty"));
        }
        let client_secret = match &o.client_secret_file {
            None => None,
            Some(p) => {
                let key = "web.oidc.client-secret-file";
                let path = self.readable_file(key, p)?;
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| self.err(key, &format!("cannot read {}: {e}", path.display())))?;
                let secret = text.trim().to_string();
                if secret.is_empty() {
                    return Err(self.err(key, &format!("{} is empty", path.display())));
                }
                Some(ClientSecret(secret))
            }
        };
        let mut scopes = o
            .scopes
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_else(|| vec!["openid".into(), "email".into(), "profile".into()]);
        if !scopes.iter().any(|s| s == "openid") {
            scopes.insert(0, "openid".into());
        }
        if let Some(bad) = scopes
            .iter()
            .find(|s| s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic() && b != b'"'))
        {
            return Err(self.err(
                "web.oidc.scopes",
                &format!("{bad:?} is not a scope (printable ASCII, no spaces)"),
            ));
        }
        let d = ClaimsConfig {
            actor: vec!["email".into(), "sub".into()],
            subject: vec!["sub".into()],
            workflow: vec!["aud".into()],
        };
        let claims = match &o.claims {
            None => d,
            Some(c) => ClaimsConfig {
                actor: c.actor.clone().map(|v| v.into_vec()).unwrap_or(d.actor),
                subject: c.subject.clone().map(|v| v.into_vec()).unwrap_or(d.subject),
                workflow: c
                    .workflow
                    .clone()
                    .map(|v| v.into_vec())
                    .unwrap_or(d.workflow),
            },
        };
        Ok(OidcConfig {
            issuer,
            client_id: o.client_id.clone(),
            client_secret,
            scopes,
            claims,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{ClientCertificates, Config};

    fn parse(dir: &std::path::Path, web: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(
            &format!("server:\n  - !channel\n    address: \"127.0.0.1:0\"\n    insecure-mode: true\nauthorization:\n  method: none\n{web}"),
            "test.yaml",
            dir,
        )
    }

    #[test]
    fn the_default_config_serves_pages_on_loopback() {
        let c = Config::embedded_default().unwrap();
        let w = c.web.as_ref().expect("web");
        assert!(w.listen.is_local() && w.tls.is_none());
        assert_eq!(w.public_url.as_deref(), Some("http://127.0.0.1:8080"));
        assert!(c
            .summary()
            .contains("--bes_results_url=http://127.0.0.1:8080/invocation/"));
    }

    #[test]
    fn bad_web_settings_name_their_key() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            ("web:\n  address: \"0.0.0.0:0\"\n  insecure-mode: true\n", "web.address", "authorization is `none`"),
            ("web:\n  insecure-mode: true\n", "web.address", "missing"),
            ("web:\n  address: \"127.0.0.1:0\"\n  insecure-mode: true\n  public-url: \"gate.example\"\n", "web.public-url", "not an http"),
            ("web:\n  address: \"127.0.0.1:0\"\n  insecure-mode: true\n  client-certificates: optional\n", "web.client-certificates", "tls-client-certs"),
            ("web:\n  address: \"127.0.0.1:0\"\n  insecure-mode: true\n  session-key-file: nope.key\n", "web.session-key-file", "nope.key"),
            ("web:\n  address: \"127.0.0.1:0\"\n  insecure-mode: true\n  oidc: { issuer: \"https://login.example\", client-id: gg }\n", "web.public-url", "redirect URI"),
            ("web:\n  address: \"127.0.0.1:0\"\n  insecure-mode: true\n  public-url: \"https://gate.example\"\n  oidc: { issuer: \"https://login.example\", client-id: gg }\n", "web.session-key-file", "missing"),
            ("web:\n  address: \"127.0.0.1:0\"\n  insecure-mode: true\n  oidc: { issuer: \"login.example\", client-id: gg }\n", "web.oidc.issuer", "http"),
            ("web:\n  address: \"127.0.0.1:0\"\n  insecure-mode: true\n  colour: blue\n", "web.colour", "unknown field"),
        ];
        for (yaml, key, reason) in cases {
            let e = parse(d.path(), yaml).unwrap_err();
            assert_eq!(e.key, key, "{yaml}: {e}");
            assert!(e.reason.contains(reason), "{yaml}: {e}");
        }
        std::fs::write(d.path().join("short.key"), "too short").unwrap();
        let e = parse(d.path(), "web:\n  address: \"127.0.0.1:0\"\n  insecure-mode: true\n  session-key-file: short.key\n").unwrap_err();
        assert_eq!(e.key, "web.session-key-file");
        assert!(e.reason.contains("at least 32"), "{e}");
    }

    #[test]
    fn a_full_web_section_loads() {
        let d = tempfile::tempdir().unwrap();
        for f in ["k", "c", "ca"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        std::fs::write(
            d.path().join("session.key"),
            "0123456789abcdef0123456789abcdef",
        )
        .unwrap();
        std::fs::write(d.path().join("secret"), "s3cret\n").unwrap();
        let c = parse(
            d.path(),
            "web:\n  address: \"127.0.0.1:0\"\n  insecure-mode: false\n  credentials: { tls-server-key: k, tls-server-cert: c, tls-client-certs: ca }\n  client-certificates: optional\n  public-url: \"https://gate.example/\"\n  session-key-file: session.key\n  oidc:\n    issuer: \"https://login.example/\"\n    client-id: gridgate\n    client-secret-file: secret\n    scopes: [email]\n",
        )
        .unwrap();
        let w = c.web.unwrap();
        assert_eq!(w.client_certificates, ClientCertificates::Optional);
        assert_eq!(w.public_url.as_deref(), Some("https://gate.example"));
        let o = w.oidc.unwrap();
        assert_eq!(o.issuer, "https://login.example");
        assert_eq!(o.scopes, vec!["openid", "email"]);
        assert_eq!(o.client_secret.unwrap().0, "s3cret");
        assert!(
            !format!("{:?}", w.session_key).contains("0123"),
            "secrets are not printed"
        );
    }
}
