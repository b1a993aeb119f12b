//! Authentication: from a request's credentials to an [`Identity`].
//!
//! Three sources, by `authorization.method`:
//! - `jwt`: a Bearer token in the `authorization` header, verified by the
//!   [`JwtAuthenticator`]; without a token, a verified client certificate alone
//!   identifies the caller.
//! - `headers`: `x-request-actor`, `x-request-subject`, `x-request-workflow` as
//!   set by a trusted proxy in front (BuildGrid's `headers` method).
//! - `none`: nobody is identified.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue};

use super::identity::{AuthMethod, Identity, PeerCertificate};
use super::jwt::{AuthError, ConnectionToken, JwtAuthenticator};

/// The identity headers of BuildGrid's `headers` method (also what gridgate
/// sends upstream for the verified caller): the actor.
pub const ACTOR_HEADER: &str = "x-request-actor";
/// The subject header of the `headers` method (see [`ACTOR_HEADER`]).
pub const SUBJECT_HEADER: &str = "x-request-subject";
/// The workflow header of the `headers` method (see [`ACTOR_HEADER`]).
pub const WORKFLOW_HEADER: &str = "x-request-workflow";

/// The caller's credentials and self-asserted identity: never passed on.
pub const CALLER_HEADERS: [&str; 4] = [
    "authorization",
    ACTOR_HEADER,
    SUBJECT_HEADER,
    WORKFLOW_HEADER,
];

/// Why a request's credentials were not accepted. Messages are safe to return
/// to the caller: they never contain a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unauthenticated {
    /// No credentials at all.
    Missing,
    /// Credentials that cannot be read.
    Malformed(&'static str),
    /// A token that failed verification.
    Token(AuthError),
}

impl Unauthenticated {
    /// A stable label for metrics, e.g. `missing` or `expired`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Unauthenticated::Missing => "missing",
            Unauthenticated::Malformed(_) => "malformed_credentials",
            Unauthenticated::Token(e) => e.metric_label(),
        }
    }
}

impl std::fmt::Display for Unauthenticated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unauthenticated::Missing => {
                f.write_str("no credentials: send authorization: Bearer <token>")
            }
            Unauthenticated::Malformed(why) => f.write_str(why),
            Unauthenticated::Token(why) => write!(f, "{why}"),
        }
    }
}

impl From<AuthError> for Unauthenticated {
    fn from(e: AuthError) -> Self {
        Unauthenticated::Token(e)
    }
}

/// What the Gate needs of a request's headers, read in one pass over them
/// (a lookup per header would hash every name again).
#[derive(Debug, Default)]
pub struct Scanned<'a> {
    /// The header list's size as HTTP/2 counts it (RFC 9113, section 6.5.2:
    /// name, value and 32 bytes per field), pseudo-headers not included.
    pub size: usize,
    /// `grpc-encoding`.
    pub encoding: Option<&'a HeaderValue>,
    /// The first `authorization` header.
    pub authorization: Option<&'a HeaderValue>,
    /// How many `authorization` headers there are.
    pub authorizations: usize,
    /// Whether any of [`CALLER_HEADERS`] is present (they are stripped).
    pub caller_headers: bool,
}

/// Reads the headers the Gate uses.
pub fn scan(headers: &HeaderMap) -> Scanned<'_> {
    let mut s = Scanned::default();
    for (name, value) in headers {
        s.size += name.as_str().len() + value.len() + 32;
        if name == http::header::AUTHORIZATION {
            s.authorizations += 1;
            s.authorization.get_or_insert(value);
            s.caller_headers = true;
        } else {
            match name.as_str() {
                "grpc-encoding" => s.encoding = Some(value),
                ACTOR_HEADER | SUBJECT_HEADER | WORKFLOW_HEADER => s.caller_headers = true,
                _ => {}
            }
        }
    }
    s
}

impl<'a> Scanned<'a> {
    /// The Bearer token, if any.
    ///
    /// The scheme is matched case-insensitively (RFC 7235). Two `authorization`
    /// headers, a non-Bearer scheme or an empty token are refused rather than
    /// guessed at.
    pub fn bearer(&self) -> Result<Option<&'a str>, Unauthenticated> {
        let Some(value) = self.authorization else {
            return Ok(None);
        };
        if self.authorizations > 1 {
            return Err(Unauthenticated::Malformed(
                "more than one authorization header",
            ));
        }
        let value = value
            .to_str()
            .map_err(|_| Unauthenticated::Malformed("authorization header is not ASCII"))?;
        let (scheme, token) = value.split_once(' ').ok_or(Unauthenticated::Malformed(
            "authorization header is not `Bearer <token>`",
        ))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Unauthenticated::Malformed(
                "authorization header is not a Bearer token",
            ));
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(Unauthenticated::Malformed("empty Bearer token"));
        }
        Ok(Some(token))
    }
}

/// The Bearer token of a request, if any (see [`Scanned::bearer`]).
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, Unauthenticated> {
    let mut s = Scanned::default();
    for value in headers.get_all(http::header::AUTHORIZATION) {
        s.authorizations += 1;
        s.authorization.get_or_insert(value);
    }
    s.bearer()
}

/// Identifies a caller by JWT, or by client certificate when no token is sent.
/// `connection` remembers the last token verified on the connection, so a
/// client repeating its token pays for a comparison, not a lookup.
pub async fn identify_jwt(
    jwt: &JwtAuthenticator,
    token: Result<Option<&str>, Unauthenticated>,
    certificate: Option<&Arc<PeerCertificate>>,
    connection: Option<&ConnectionToken>,
) -> Result<Arc<Identity>, Unauthenticated> {
    match (token?, connection) {
        (Some(token), Some(slot)) => Ok(jwt
            .authenticate_on_connection(token, slot, certificate)
            .await?),
        (Some(token), None) => {
            let mut identity = jwt.authenticate(token).await?;
            identity.certificate = certificate.cloned();
            Ok(Arc::new(identity))
        }
        (None, _) => match certificate {
            Some(cert) => Ok(Arc::new(certificate_identity(cert.clone()))),
            None => Err(Unauthenticated::Missing),
        },
    }
}

/// An identity established by a verified client certificate alone.
pub fn certificate_identity(cert: Arc<PeerCertificate>) -> Identity {
    let mut identity = Identity::anonymous(Some(cert));
    identity.method = AuthMethod::Certificate;
    identity
}

/// Identifies a caller by BuildGrid's trusted identity headers.
pub fn identify_headers(
    headers: &HeaderMap,
    certificate: Option<&Arc<PeerCertificate>>,
) -> Result<Identity, Unauthenticated> {
    let read = |name: &str| -> Result<Option<String>, Unauthenticated> {
        let mut values = headers.get_all(name).iter();
        let Some(v) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(Unauthenticated::Malformed("an identity header is repeated"));
        }
        v.to_str()
            .map(|s| Some(s.to_string()))
            .map_err(|_| Unauthenticated::Malformed("an identity header is not ASCII"))
    };
    let actor = read(ACTOR_HEADER)?;
    let subject = read(SUBJECT_HEADER)?;
    let workflow = read(WORKFLOW_HEADER)?;
    if actor.is_none() && subject.is_none() && workflow.is_none() {
        return match certificate {
            Some(cert) => Ok(certificate_identity(cert.clone())),
            None => Err(Unauthenticated::Malformed(
                "no x-request-actor, x-request-subject or x-request-workflow header",
            )),
        };
    }
    let mut identity = Identity::anonymous(certificate.cloned());
    identity.method = AuthMethod::Headers;
    identity.actor = actor;
    identity.subject = subject;
    identity.workflow = workflow;
    Ok(identity)
}

/// Removes the caller's credentials and self-asserted identity headers, so
/// that nothing behind the gate sees a token or an identity it did not verify.
/// (The verified identity travels in the request's `Admission`; an upstream is
/// sent it as `x-request-*` headers when the request is forwarded.)
pub fn strip_caller_credentials(headers: &mut HeaderMap) {
    for name in CALLER_HEADERS {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn bearer_forms() {
        assert_eq!(bearer(&headers(&[])), Ok(None));
        assert_eq!(
            bearer(&headers(&[("authorization", "Bearer abc")])),
            Ok(Some("abc"))
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "bearer abc")])),
            Ok(Some("abc"))
        );
        assert!(bearer(&headers(&[("authorization", "Basic abc")])).is_err());
        assert!(bearer(&headers(&[("authorization", "Bearer ")])).is_err());
        assert!(bearer(&headers(&[("authorization", "Bearerabc")])).is_err());
        assert!(bearer(&headers(&[
            ("authorization", "Bearer a"),
            ("authorization", "Bearer b")
        ]))
        .is_err());
    }

    #[test]
    fn one_scan_finds_what_the_gate_reads() {
        let h = headers(&[
            ("grpc-encoding", "gzip"),
            ("authorization", "Bearer abc"),
            ("x-other", "v"),
        ]);
        let s = scan(&h);
        assert_eq!(s.encoding.unwrap(), "gzip");
        assert_eq!(s.bearer(), Ok(Some("abc")));
        assert!(s.caller_headers);
        assert_eq!(
            s.size,
            "grpc-encoding".len() + 4 + "authorization".len() + 10 + 7 + 1 + 3 * 32
        );
        let h = headers(&[("x-request-actor", "a")]);
        let s = scan(&h);
        assert!(s.caller_headers);
        assert_eq!(s.bearer(), Ok(None));
        assert!(!scan(&headers(&[("x-other", "v")])).caller_headers);
    }

    #[test]
    fn headers_identity_and_strip() {
        let h = headers(&[("x-request-actor", "ci"), ("x-request-subject", "repo")]);
        let id = identify_headers(&h, None).unwrap();
        assert_eq!(id.actor.as_deref(), Some("ci"));
        assert_eq!(id.workflow, None);
        assert!(identify_headers(&headers(&[]), None).is_err());

        let mut h = headers(&[
            ("authorization", "Bearer secret"),
            ("x-request-actor", "forged"),
            ("x-request-workflow", "forged"),
            ("x-other", "kept"),
        ]);
        strip_caller_credentials(&mut h);
        assert!(h.get("authorization").is_none());
        assert!(h.get("x-request-actor").is_none());
        assert!(h.get("x-request-workflow").is_none());
        assert_eq!(h.len(), 1, "other headers stay: {h:?}");
    }
}
