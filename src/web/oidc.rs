//! Sign-in with OpenID Connect: the authorization code flow with PKCE
//! (RFC 7636, `S256`), `state` and `nonce`, against the issuer of
//! `web.oidc`.
//!
//! 1. `/auth/sign-in?next=PATH` makes a state, a nonce and a PKCE verifier,
//!    keeps them (and where to go back to) in a sealed ten-minute cookie, and
//!    sends the browser to the issuer's authorization endpoint.
//! 2. `/auth/callback?code&state` checks the state against the cookie,
//!    redeems the code at the token endpoint with the verifier (and the
//!    client secret, when configured), verifies the ID token and its nonce,
//!    and sets the session cookie: the ID token, sealed, expiring with it.
//! 3. Every later request verifies the ID token in the session again, so the
//!    identity always comes from a verified token and the session ends when
//!    the token does; any replica with the same key file can do it.
//!
//! The issuer's endpoints come from its discovery document at
//! `<issuer>/.well-known/openid-configuration` (the issuer named in the
//! config, and the document must name the same issuer); key URLs named in a
//! token are never used. The ID token is verified by the Gate's own JWT
//! verifier ([`JwtAuthenticator`]: the signing key from the issuer's key set,
//! `iss`, `aud` = the client id, `exp`, `nbf`, `iat`) with the claims mapping
//! of `web.oidc.claims`, so it meets the same policy rules as a Bearer token.
//!
//! Why not the `openidconnect` crate: it verifies ID tokens with its own
//! RustCrypto stack (rsa, p256, p384, ed25519-dalek) next to the aws-lc-rs
//! one gridgate verifies every other token with, and its key handling would
//! be a second set of JWKS rules (refetch on unknown `kid`, staleness, size
//! limits) beside the Gate's. What remains of the flow is two HTTP requests
//! and a few checks, written here against the RFCs.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::digest;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::config::OidcConfig;
use crate::gate::identity::Identity;
use crate::gate::jwks::{self, JwksSettings};
use crate::gate::jwt::{self, AuthError, JwtAuthenticator};

/// How long a sign-in may take (the sign-in cookie's life).
pub const SIGN_IN_SECONDS: i64 = 600;
/// Timeout of each request to the issuer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The largest discovery document or token response read.
const MAX_RESPONSE: usize = 256 * 1024;
/// Signature algorithms accepted for ID tokens (never HMAC or `none`).
const ALGORITHMS: [jsonwebtoken::Algorithm; 9] = {
    use jsonwebtoken::Algorithm::*;
    [
        RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA,
    ]
};

/// Why a sign-in failed (safe to show: no token, no secret).
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    /// The issuer could not be asked.
    #[error("the OpenID provider is unavailable: {0}")]
    Provider(String),
    /// The callback does not belong to a sign-in of this browser.
    #[error("this sign-in was not started here or took too long; start again")]
    State,
    /// The issuer refused (its `error` code).
    #[error("the OpenID provider refused the sign-in: {0}")]
    Refused(String),
    /// The ID token did not verify.
    #[error("the ID token was refused: {0}")]
    Token(String),
}

/// What the issuer's discovery document says (the parts used).
#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    id_token_signing_alg_values_supported: Vec<String>,
}

/// The issuer's endpoints and the verifier of its ID tokens.
struct Provider {
    authorization_endpoint: reqwest::Url,
    token_endpoint: reqwest::Url,
    verifier: Arc<JwtAuthenticator>,
}

/// What the sign-in cookie holds.
#[derive(Serialize, Deserialize)]
pub struct SignInState {
    /// `state`.
    pub s: String,
    /// `nonce`.
    pub n: String,
    /// The PKCE code verifier.
    pub v: String,
    /// The local path to return to.
    pub next: String,
}

/// Sign-in with one OpenID provider.
pub struct Oidc {
    config: OidcConfig,
    redirect_uri: String,
    client: reqwest::Client,
    provider: tokio::sync::OnceCell<Provider>,
}

/// Checks an endpoint URL the way key set URLs are checked: https, or http
/// to a loopback host.
fn endpoint(url: &str, what: &str) -> Result<reqwest::Url, SignInError> {
    jwks::check_url(url).map_err(|e| SignInError::Provider(format!("{what}: {e}")))
}

/// Reads a response body up to [`MAX_RESPONSE`].
async fn read_limited(mut r: reqwest::Response) -> Result<Vec<u8>, SignInError> {
    let mut out = Vec::new();
    while let Some(chunk) = r
        .chunk()
        .await
        .map_err(|e| SignInError::Provider(e.without_url().to_string()))?
    {
        if out.len() + chunk.len() > MAX_RESPONSE {
            return Err(SignInError::Provider("response too large".into()));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

impl Oidc {
    /// Sign-in with `config`'s issuer, returning to `public_url`.
    pub fn new(config: &OidcConfig, public_url: &str) -> Result<Oidc, String> {
        endpoint(&config.issuer, "web.oidc.issuer").map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("gridgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Oidc {
            config: config.clone(),
            redirect_uri: format!("{public_url}/auth/callback"),
            client,
            provider: tokio::sync::OnceCell::new(),
        })
    }

    /// The issuer, for messages.
    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// The provider, discovered on first use (a failure is tried again next time).
    async fn provider(&self) -> Result<&Provider, SignInError> {
        self.provider.get_or_try_init(|| self.discover()).await
    }

    async fn discover(&self) -> Result<Provider, SignInError> {
        let url = format!("{}/.well-known/openid-configuration", self.config.issuer);
        let url = endpoint(&url, "discovery")?;
        let r = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| SignInError::Provider(e.without_url().to_string()))?;
        if !r.status().is_success() {
            return Err(SignInError::Provider(format!(
                "discovery answered {}",
                r.status()
            )));
        }
        let body = read_limited(r).await?;
        let d: Discovery = serde_json::from_slice(&body)
            .map_err(|e| SignInError::Provider(format!("discovery document: {e}")))?;
        if d.issuer.trim_end_matches('/') != self.config.issuer {
            return Err(SignInError::Provider(format!(
                "the discovery document names issuer {:?}, not the configured one",
                crate::gate::audit::bounded(&d.issuer)
            )));
        }
        let supported: Vec<jsonwebtoken::Algorithm> =
            if d.id_token_signing_alg_values_supported.is_empty() {
                vec![jsonwebtoken::Algorithm::RS256]
            } else {
                ALGORITHMS
                    .iter()
                    .copied()
                    .filter(|a| {
                        d.id_token_signing_alg_values_supported
                            .iter()
                            .any(|s| s == &format!("{a:?}"))
                    })
                    .collect()
            };
        if supported.is_empty() {
            return Err(SignInError::Provider(
                "the provider signs ID tokens with no algorithm gridgate accepts".into(),
            ));
        }
        let jwks_url = endpoint(&d.jwks_uri, "jwks_uri")?;
        let settings = jwt::JwtSettings {
            providers: vec![jwt::ProviderSettings {
                name: "web.oidc".into(),
                issuer: Some(d.issuer.clone()),
                algorithms: supported,
                key: jwt::KeySource::Jwks(JwksSettings {
                    urls: vec![jwks_url.to_string()],
                    refresh: Duration::from_secs(600),
                    max_staleness: None,
                    min_refetch_interval: Duration::from_secs(30),
                    timeout: JwksSettings::DEFAULT_TIMEOUT,
                }),
                audiences: vec![self.config.client_id.clone()],
                allow_weak_secret: false,
            }],
            claims: jwt::ClaimMapping {
                actor: self.config.claims.actor.clone(),
                subject: self.config.claims.subject.clone(),
                workflow: self.config.claims.workflow.clone(),
            },
            ..jwt::JwtSettings::default()
        };
        let verifier =
            JwtAuthenticator::new(settings).map_err(|e| SignInError::Provider(e.to_string()))?;
        verifier.start().await;
        Ok(Provider {
            authorization_endpoint: endpoint(&d.authorization_endpoint, "authorization_endpoint")?,
            token_endpoint: endpoint(&d.token_endpoint, "token_endpoint")?,
            verifier,
        })
    }

    /// Starts a sign-in: the state to keep in the sign-in cookie and the
    /// authorization URL to send the browser to.
    pub async fn begin(&self, next: &str) -> Result<(SignInState, String), SignInError> {
        let provider = self.provider().await?;
        let random = || {
            super::session::random_token(32)
                .ok_or_else(|| SignInError::Provider("no randomness".into()))
        };
        let state = SignInState {
            s: random()?,
            n: random()?,
            v: random()?,
            next: next.to_string(),
        };
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(digest::digest(&digest::SHA256, state.v.as_bytes()));
        let mut url = provider.authorization_endpoint.clone();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.config.client_id)
            .append_pair("redirect_uri", &self.redirect_uri)
            .append_pair("scope", &self.config.scopes.join(" "))
            .append_pair("state", &state.s)
            .append_pair("nonce", &state.n)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok((state, url.to_string()))
    }

    /// Finishes a sign-in: redeems `code` and returns the verified ID token
    /// with its identity and expiry (Unix seconds).
    pub async fn finish(
        &self,
        kept: &SignInState,
        code: &str,
        state: &str,
    ) -> Result<(String, Identity, i64), SignInError> {
        if !super::session::same_secret(&kept.s, state) {
            return Err(SignInError::State);
        }
        let provider = self.provider().await?;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.redirect_uri.as_str()),
            ("code_verifier", kept.v.as_str()),
        ];
        let mut request = self.client.post(provider.token_endpoint.clone());
        match &self.config.client_secret {
            Some(secret) => {
                request = request.basic_auth(
                    form_urlencode(&self.config.client_id),
                    Some(form_urlencode(&secret.0)),
                );
            }
            None => form.push(("client_id", self.config.client_id.as_str())),
        }
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", form_urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let r = request
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| SignInError::Provider(e.without_url().to_string()))?;
        let status = r.status();
        let body = read_limited(r).await?;
        #[derive(Deserialize)]
        struct TokenResponse {
            id_token: Option<String>,
            error: Option<String>,
        }
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            SignInError::Provider(format!("the token endpoint answered {status} without JSON"))
        })?;
        if let Some(e) = t.error {
            return Err(SignInError::Refused(
                crate::gate::audit::bounded(&e).to_string(),
            ));
        }
        let id_token = t
            .id_token
            .ok_or_else(|| SignInError::Refused("no id_token in the token response".into()))?;
        let identity = provider
            .verifier
            .authenticate(&id_token)
            .await
            .map_err(|e| SignInError::Token(e.to_string()))?;
        let nonce = identity.claims.get("nonce").and_then(|n| n.as_str());
        if !nonce.is_some_and(|n| super::session::same_secret(n, &kept.n)) {
            return Err(SignInError::Token("nonce mismatch".into()));
        }
        let exp = identity
            .claims
            .get("exp")
            .and_then(serde_json::Value::as_i64)
            .ok_or_else(|| SignInError::Token("no exp".into()))?;
        Ok((id_token, identity, exp))
    }

    /// The identity of a session's ID token, verified again.
    pub async fn verify_session(&self, id_token: &str) -> Result<Identity, AuthError> {
        let provider = self.provider().await.map_err(|_| AuthError::Malformed)?;
        provider.verifier.authenticate(id_token).await
    }
}

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749
/// appendix B, also for the Basic credentials).
fn form_urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Whether `next` is a path on this site (not `//host`, not a URL), so the
/// sign-in cannot be used to send someone elsewhere.
pub fn local_path(next: &str) -> &str {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && !next.chars().any(|c| c.is_control() || c == '\\')
        && next.len() <= 2048;
    if ok {
        next
    } else {
        "/"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_returned_to() {
        assert_eq!(local_path("/invocation/abc?x=1"), "/invocation/abc?x=1");
        for bad in [
            "//evil.example/",
            "https://evil.example/",
            "/\\evil",
            "evil",
            "",
            "/a\nb",
        ] {
            assert_eq!(local_path(bad), "/", "{bad:?}");
        }
    }

    #[test]
    fn form_values_are_encoded() {
        assert_eq!(form_urlencode("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
    }
}
