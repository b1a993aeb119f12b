//! Who is looking: the viewer of a page or API call, and what the Gate lets
//! them see.
//!
//! One identity per request, from the first of: an `Authorization: Bearer`
//! token (verified by the Gate's JWT verifier, as on gRPC), the session
//! cookie (an ID token of `web.oidc`'s issuer, verified again on every
//! request), the connection's verified client certificate. Without any, the
//! viewer is anonymous and sees only instances listed in
//! `authorization.allow-unauthenticated-instances` whose policy lets an
//! anonymous caller query them (`allow-localhost-requests` does not apply
//! to pages: a browser on the gateway's host is not a trusted local tool).
//!
//! Every decision is the Gate's ([`Gate::decide`]), as `QueryEventStreams`
//! on the invocation's instance (and `Read` for a blob of its CAS).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::session::{self, Sealer, SESSION};
use super::WebConn;
use crate::config::AuthMethod as Method;
use crate::gate::authn::{self, Unauthenticated};
use crate::gate::identity::{AuthMethod, Identity};
use crate::gate::{Admission, Authorizer, Gate};

/// The ACL name pages and API calls are decided as.
pub const QUERY_RPC: &str = crate::bes::query::QUERY_RPC;

/// How a viewer was identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignedIn {
    /// No credentials.
    Anonymous,
    /// A verified client certificate.
    Certificate,
    /// A Bearer token.
    Bearer,
    /// A session cookie; `csrf` is the token its sign-out form carries.
    Session {
        /// The sign-out form's CSRF token.
        csrf: String,
    },
}

/// The viewer of one request.
#[derive(Clone)]
pub struct Viewer {
    /// The verified identity.
    pub identity: Arc<Identity>,
    /// How.
    pub how: SignedIn,
    /// A session cookie was sent but did not open or has expired.
    pub session_ended: bool,
    authorizer: Arc<WebAuthorizer>,
}

/// What the session cookie holds.
#[derive(Serialize, Deserialize)]
pub struct SessionCookie {
    /// The ID token.
    pub t: String,
    /// The sign-out form's CSRF token.
    pub c: String,
}

impl Viewer {
    /// Whether the Gate lets the viewer call `rpc` on `instance`.
    pub fn may(&self, instance: &str, rpc: &str) -> bool {
        self.authorizer.allows(&self.identity, instance, rpc)
    }

    /// The verdict's reason for `rpc` on `instance` (for a viewer who named
    /// the instance).
    pub fn reason(&self, instance: &str, rpc: &str) -> String {
        if self.anonymous_refused(instance) {
            return format!("instance {instance:?} is not open to anonymous viewers: sign in");
        }
        self.authorizer
            .gate
            .decide(Some(instance), rpc, &self.identity)
            .reason
            .to_string()
    }

    fn anonymous_refused(&self, instance: &str) -> bool {
        self.authorizer.anonymous_refused(&self.identity, instance)
    }

    /// Whether the viewer has no credentials.
    pub fn is_anonymous(&self) -> bool {
        self.how == SignedIn::Anonymous
    }

    /// The admission the Invocations service is called with.
    pub fn admission(&self) -> Admission {
        Admission {
            identity: self.identity.clone(),
            instance: None,
            rpc: QUERY_RPC,
            authorizer: self.authorizer.clone(),
        }
    }

    /// A short name for the page header.
    pub fn display_name(&self) -> String {
        let id = &self.identity;
        let from_claims = ["email", "preferred_username", "name"]
            .iter()
            .find_map(|c| {
                id.claims
                    .get(*c)
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            });
        from_claims
            .or_else(|| id.actor.clone())
            .or_else(|| id.subject.clone())
            .or_else(|| {
                id.certificate
                    .as_ref()
                    .map(|c| c.common_name.clone().unwrap_or_else(|| c.subject.clone()))
            })
            .unwrap_or_else(|| "anonymous".into())
    }
}

/// The Gate's decision, with the exemption rule for anonymous viewers.
pub struct WebAuthorizer {
    gate: Arc<Gate>,
}

impl WebAuthorizer {
    /// Decides with `gate`.
    pub fn new(gate: Arc<Gate>) -> Arc<WebAuthorizer> {
        Arc::new(WebAuthorizer { gate })
    }

    /// The Gate it asks.
    pub fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }

    fn anonymous_refused(&self, identity: &Identity, instance: &str) -> bool {
        identity.method == AuthMethod::Anonymous
            && identity.certificate.is_none()
            && self.gate.method != Method::None
            && !self.gate.unauthenticated_instances.contains(instance)
    }
}

impl Authorizer for WebAuthorizer {
    fn allows(&self, identity: &Identity, instance: &str, rpc: &str) -> bool {
        !self.anonymous_refused(identity, instance)
            && self.gate.decide(Some(instance), rpc, identity).allowed
    }
}

/// Identifies the viewer of a request. Credentials that are sent and fail
/// are an error (the caller sees why); a session that ended is not.
pub async fn identify(
    authorizer: &Arc<WebAuthorizer>,
    sealer: Option<&Sealer>,
    oidc: Option<&super::oidc::Oidc>,
    headers: &http::HeaderMap,
    conn: &WebConn,
) -> Result<Viewer, Unauthenticated> {
    let gate = &authorizer.gate;
    let certificate = conn.certificate.clone();
    let viewer = |identity: Identity, how: SignedIn| Viewer {
        identity: Arc::new(identity),
        how,
        session_ended: false,
        authorizer: authorizer.clone(),
    };
    if let Some(token) = authn::bearer(headers)? {
        let jwt = match (gate.method, gate.jwt()) {
            (Method::Jwt, Some(jwt)) => jwt,
            _ => {
                return Err(Unauthenticated::Malformed(
                    "this gateway verifies no Bearer tokens (authorization.method is not jwt)",
                ))
            }
        };
        let mut identity = jwt.authenticate(token).await?;
        identity.certificate = certificate;
        return Ok(viewer(identity, SignedIn::Bearer));
    }
    let mut session_ended = false;
    if let (Some(sealer), Some(oidc)) = (sealer, oidc) {
        if let Some(value) = session::cookie_value(headers, SESSION) {
            let opened = sealer
                .open(SESSION, &value)
                .and_then(|p| serde_json::from_slice::<SessionCookie>(&p).ok());
            match opened {
                Some(s) => match oidc.verify_session(&s.t).await {
                    Ok(mut identity) => {
                        identity.certificate = certificate;
                        return Ok(viewer(identity, SignedIn::Session { csrf: s.c }));
                    }
                    Err(_) => session_ended = true,
                },
                None => session_ended = true,
            }
        }
    }
    let mut v = match certificate {
        Some(cert) => viewer(authn::certificate_identity(cert), SignedIn::Certificate),
        None => viewer(Identity::anonymous(None), SignedIn::Anonymous),
    };
    v.session_ended = session_ended;
    Ok(v)
}
