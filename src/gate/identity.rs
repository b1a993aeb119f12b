//! Who is calling: the verified identity the Gate attaches to every admitted request.
//!
//! An [`Identity`] is built by exactly one authenticator (JWT, trusted headers,
//! client certificate, or none) and is then read by the policy and, through the
//! request extensions, by services that want to audit or meter their callers.

use std::sync::Arc;

use serde_json::{Map, Value};

/// How the caller's identity was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// No credentials were needed (authorization `none`, an instance listed in
    /// `allow-unauthenticated-instances`, or a local peer with `allow-localhost-requests`).
    Anonymous,
    /// A verified JSON Web Token.
    Jwt,
    /// `x-request-actor` / `x-request-subject` / `x-request-workflow` set by a trusted proxy.
    Headers,
    /// Only a verified client certificate.
    Certificate,
}

impl AuthMethod {
    /// The lower-case name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Anonymous => "anonymous",
            AuthMethod::Jwt => "jwt",
            AuthMethod::Headers => "headers",
            AuthMethod::Certificate => "certificate",
        }
    }
}

/// The identity carried by a verified client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The subject distinguished name in RFC 4514 form, e.g. `CN=ci-bot,O=Example`.
    pub subject: String,
    /// The subject's common name, when it has one.
    pub common_name: Option<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// URI subject alternative names (e.g. SPIFFE ids).
    pub uris: Vec<String>,
    /// E-mail (rfc822Name) subject alternative names.
    pub emails: Vec<String>,
    /// IP address subject alternative names, as text.
    pub ips: Vec<String>,
}

/// The verified caller of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// How it was established.
    pub method: AuthMethod,
    /// BuildGrid's "actor": the token's `act` claim (or `sub` when absent), or `x-request-actor`.
    pub actor: Option<String>,
    /// BuildGrid's "subject": the token's `sub` claim, or `x-request-subject`.
    pub subject: Option<String>,
    /// BuildGrid's "workflow": the token's `aud` (first entry), or `x-request-workflow`.
    pub workflow: Option<String>,
    /// Every claim of the verified token (empty for other methods).
    pub claims: Arc<Map<String, Value>>,
    /// The verified client certificate of the connection, if any.
    pub certificate: Option<Arc<PeerCertificate>>,
}

impl Identity {
    /// An identity with no credentials at all.
    pub fn anonymous(certificate: Option<Arc<PeerCertificate>>) -> Self {
        Identity {
            method: AuthMethod::Anonymous,
            actor: None,
            subject: None,
            workflow: None,
            claims: Arc::new(Map::new()),
            certificate,
        }
    }

    /// The value of a field a policy rule can match, by name.
    ///
    /// `actor`, `subject` and `workflow` are the BuildGrid fields. `claim:NAME` (or
    /// `claims.NAME`) is any token claim: strings as they are, numbers and booleans
    /// in their JSON text (`true`, `42`), so CI claims such as `ref_protected`
    /// match whether the issuer sends them as strings or not; objects and arrays
    /// match nothing. `cert:subject`, `cert:cn`, `cert:dns`, `cert:uri`, `cert:email`
    /// and `cert:ip` read the client certificate; for the SAN fields every value is
    /// returned and a rule matches when any of them does.
    pub fn field_values(&self, field: &str) -> Vec<String> {
        match field {
            "actor" => self.actor.iter().cloned().collect(),
            "subject" => self.subject.iter().cloned().collect(),
            "workflow" => self.workflow.iter().cloned().collect(),
            _ => {
                if let Some(name) = field
                    .strip_prefix("claim:")
                    .or_else(|| field.strip_prefix("claims."))
                {
                    return claim_as_text(self.claims.get(name)).into_iter().collect();
                }
                if let Some(part) = field.strip_prefix("cert:") {
                    let Some(cert) = self.certificate.as_deref() else {
                        return Vec::new();
                    };
                    return match part {
                        "subject" => vec![cert.subject.clone()],
                        "cn" => cert.common_name.iter().cloned().collect(),
                        "dns" => cert.dns_names.clone(),
                        "uri" => cert.uris.clone(),
                        "email" => cert.emails.clone(),
                        "ip" => cert.ips.clone(),
                        _ => Vec::new(),
                    };
                }
                Vec::new()
            }
        }
    }
}

/// A claim value as the text a rule pattern is matched against.
pub fn claim_as_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
