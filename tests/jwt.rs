//! The JWT authenticator against real tokens and a real HTTP key set server.

#[path = "common/jwks_server.rs"]
mod jwks_server;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use gridgate::gate::identity::AuthMethod;
use gridgate::gate::jwks::JwksSettings;
use gridgate::gate::jwt::{
    AuthError, ClaimMapping, JwtAuthenticator, JwtConfigError, JwtSettings, KeySource,
    ProviderSettings, MAX_TOKEN_BYTES,
};
use jsonwebtoken::Algorithm;
use jwks_server::{
    b64url, claims, now, random_bytes, rsa_1024_jwk, unsigned_token, Behavior, JwksServer, TestKey,
    RSA_1024_PUBLIC_PEM,
};
use serde_json::{json, Value};

const GITHUB: &str = "https://token.actions.githubusercontent.com";
const GITLAB: &str = "https://gitlab.example.com";

// ---------------------------------------------------------------- helpers

fn provider(
    name: &str,
    issuer: Option<&str>,
    algorithms: &[Algorithm],
    key: KeySource,
    audiences: &[&str],
) -> ProviderSettings {
    ProviderSettings {
        name: name.to_owned(),
        issuer: issuer.map(str::to_owned),
        algorithms: algorithms.to_vec(),
        key,
        audiences: audiences.iter().map(|a| a.to_string()).collect(),
        allow_weak_secret: false,
    }
}

fn settings(providers: Vec<ProviderSettings>) -> JwtSettings {
    JwtSettings {
        providers,
        ..JwtSettings::default()
    }
}

/// The refetch hold-off of [`jwks`]: short, since a token with an unknown
/// kid inside it waits for the next fetch.
const HOLD_OFF: Duration = Duration::from_secs(1);

/// Key set settings for tests: no periodic refresh unless asked, no staleness limit.
fn jwks(urls: &[String]) -> JwksSettings {
    JwksSettings {
        urls: urls.to_vec(),
        refresh: Duration::from_secs(3600),
        max_staleness: None,
        min_refetch_interval: HOLD_OFF,
        timeout: Duration::from_secs(2),
    }
}

fn secret_auth(key: &TestKey) -> Arc<JwtAuthenticator> {
    JwtAuthenticator::new(settings(vec![provider(
        "default",
        None,
        &[key.alg],
        KeySource::Secret(key.secret().to_vec()),
        &[],
    )]))
    .expect("config")
}

async fn jwks_auth(
    server: &JwksServer,
    algorithms: &[Algorithm],
    issuer: Option<&str>,
    audiences: &[&str],
) -> Arc<JwtAuthenticator> {
    let auth = JwtAuthenticator::new(settings(vec![provider(
        "idp",
        issuer,
        algorithms,
        KeySource::Jwks(jwks(&[server.url()])),
        audiences,
    )]))
    .expect("config");
    auth.start().await;
    auth
}

/// Shared RSA keys: generating them is the slow part of these tests.
fn rsa_key(index: usize) -> &'static TestKey {
    static KEYS: OnceLock<Vec<TestKey>> = OnceLock::new();
    &KEYS.get_or_init(|| {
        (0..4)
            .map(|i| TestKey::rsa(Algorithm::RS256, &format!("rsa-{i}")))
            .collect()
    })[index]
}

fn hs256() -> TestKey {
    TestKey::hmac(Algorithm::HS256, &random_bytes(32))
}

fn with(mut claims: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().expect("object") {
        if v.is_null() {
            claims.as_object_mut().expect("object").remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

fn base() -> Value {
    claims("issuer", "gate", "alice")
}

async fn until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------- algorithms

#[tokio::test]
async fn hmac_algorithms_with_secret() {
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let key = TestKey::generate(alg, "unused").with_kid(None);
        let auth = secret_auth(&key);
        assert!(auth.ready(), "secret providers are always ready");
        let identity = auth
            .authenticate(&key.sign(&base()))
            .await
            .expect("valid token");
        assert_eq!(identity.method, AuthMethod::Jwt);
        assert_eq!(identity.subject.as_deref(), Some("alice"));
        assert_eq!(identity.actor.as_deref(), Some("alice"));
        assert_eq!(identity.workflow.as_deref(), Some("gate"));
        assert_eq!(identity.claims["iss"], "issuer");
        // Another secret: bad signature.
        let other = TestKey::hmac(alg, &random_bytes(64));
        assert_eq!(
            auth.authenticate(&other.sign(&base())).await,
            Err(AuthError::BadSignature)
        );
    }
}

#[tokio::test]
async fn every_asymmetric_family_through_a_key_set() {
    let keys = [
        TestKey::rsa(Algorithm::RS256, "rs256"),
        TestKey::rsa(Algorithm::PS256, "ps256"),
        TestKey::ec(Algorithm::ES256, "es256"),
        TestKey::ec(Algorithm::ES384, "es384"),
        TestKey::ed25519("eddsa"),
    ];
    let refs: Vec<&TestKey> = keys.iter().collect();
    let server = JwksServer::start(&refs).await;
    let algs = [
        Algorithm::RS256,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];
    let auth = jwks_auth(&server, &algs, None, &[]).await;
    assert!(auth.ready());
    for key in &keys {
        let identity = auth
            .authenticate(&key.sign(&base()))
            .await
            .unwrap_or_else(|e| panic!("{:?}: {e}", key.alg));
        assert_eq!(identity.subject.as_deref(), Some("alice"));
    }
    assert_eq!(server.requests(), 1);
    // The RS256 key may not verify a PS256 token naming it (its JWK says alg RS256).
    let header = json!({"alg": "PS256", "kid": "rs256"});
    assert_eq!(
        auth.authenticate(&keys[1].sign_with_header(&header, &base()))
            .await,
        Err(AuthError::KeyAlgorithmMismatch)
    );
}

#[tokio::test]
async fn public_key_pem_as_the_secret() {
    let rsa = rsa_key(0);
    let cases: Vec<(TestKey, Vec<Algorithm>)> = vec![
        (TestKey::ec(Algorithm::ES256, "e"), vec![Algorithm::ES256]),
        (TestKey::ec(Algorithm::ES384, "e"), vec![Algorithm::ES384]),
        (TestKey::ed25519("d"), vec![Algorithm::EdDSA]),
    ];
    // RSA: one PEM serves RS256 and PS256 tokens.
    let auth = JwtAuthenticator::new(settings(vec![provider(
        "default",
        None,
        &[Algorithm::RS256, Algorithm::PS256],
        KeySource::PublicKeyPem(rsa.public_pem().as_bytes().to_vec()),
        &[],
    )]))
    .expect("config");
    assert!(auth.ready());
    let token = rsa.sign(&base());
    assert!(auth.authenticate(&token).await.is_ok());
    let ps = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::PS256),
        &base(),
        rsa.encoding_key(),
    )
    .expect("sign PS256");
    assert!(auth.authenticate(&ps).await.is_ok());
    assert_eq!(
        auth.authenticate(&rsa_key(1).sign(&base())).await,
        Err(AuthError::BadSignature)
    );
    for (key, algs) in cases {
        let auth = JwtAuthenticator::new(settings(vec![provider(
            "default",
            None,
            &algs,
            KeySource::PublicKeyPem(key.public_pem().as_bytes().to_vec()),
            &[],
        )]))
        .expect("config");
        assert!(
            auth.authenticate(&key.sign(&base())).await.is_ok(),
            "{algs:?}"
        );
    }
}

// ---------------------------------------------------------------- attack tokens

#[tokio::test]
async fn alg_none_in_any_casing_is_refused() {
    let key = hs256();
    let hmac = secret_auth(&key);
    let rsa = rsa_key(0);
    let server = JwksServer::start(&[rsa]).await;
    let jwks = jwks_auth(&server, &[Algorithm::RS256], None, &[]).await;
    for alg in ["none", "None", "NONE", "nOnE"] {
        for signature in ["", "AAAA", "c2lnbmF0dXJl"] {
            for kid in [None, Some("rsa-0")] {
                let mut header = json!({"alg": alg, "typ": "JWT"});
                if let Some(kid) = kid {
                    header["kid"] = json!(kid);
                }
                let token = unsigned_token(&header, &base(), signature);
                for auth in [&hmac, &jwks] {
                    let result = auth.authenticate(&token).await;
                    assert!(
                        matches!(
                            result,
                            Err(AuthError::AlgorithmNotAllowed) | Err(AuthError::Malformed)
                        ),
                        "{alg} {signature:?}: {result:?}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let rsa = rsa_key(0);
    let pem = rsa.public_pem().as_bytes().to_vec();
    let forged = TestKey::hmac(Algorithm::HS256, &pem).with_kid(Some("rsa-0"));
    // PEM provider (BuildGrid style).
    let auth = JwtAuthenticator::new(settings(vec![provider(
        "default",
        None,
        &[Algorithm::RS256],
        KeySource::PublicKeyPem(pem.clone()),
        &[],
    )]))
    .expect("config");
    assert_eq!(
        auth.authenticate(&forged.sign(&base())).await,
        Err(AuthError::AlgorithmNotAllowed)
    );
    // Key set provider, the token naming the RSA key's kid.
    let server = JwksServer::start(&[rsa]).await;
    let auth = jwks_auth(&server, &[Algorithm::RS256], None, &[]).await;
    assert_eq!(
        auth.authenticate(&forged.sign(&base())).await,
        Err(AuthError::AlgorithmNotAllowed)
    );
    // Also signed with the JWK's `n` text, another classic.
    let n = rsa.jwk()["n"].as_str().expect("n").to_owned();
    let forged = TestKey::hmac(Algorithm::HS256, n.as_bytes()).with_kid(Some("rsa-0"));
    assert_eq!(
        auth.authenticate(&forged.sign(&base())).await,
        Err(AuthError::AlgorithmNotAllowed)
    );
    // And a provider may not mix HMAC with a public key.
    let err = JwtAuthenticator::new(settings(vec![provider(
        "default",
        None,
        &[Algorithm::RS256, Algorithm::HS256],
        KeySource::PublicKeyPem(pem),
        &[],
    )]))
    .expect_err("mixed families");
    assert!(
        matches!(err, JwtConfigError::AlgorithmKeyMismatch { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn jku_x5u_jwk_x5c_headers_are_never_followed() {
    let legit = rsa_key(0);
    let attacker_key = rsa_key(1);
    let evil = TestKey::rsa(Algorithm::RS256, "evil");
    let server = JwksServer::start(&[legit]).await;
    let attacker = JwksServer::start(&[&evil, attacker_key]).await;
    let auth = jwks_auth(&server, &[Algorithm::RS256], None, &[]).await;
    let embedded = evil.jwk();
    for kid in ["evil", "rsa-0"] {
        let header = json!({
            "alg": "RS256",
            "typ": "JWT",
            "kid": kid,
            "jku": attacker.url(),
            "x5u": attacker.url_for("cert.pem"),
            "jwk": embedded,
            "x5c": ["MIIBszCCAVmgAwIBAgIUEXAMPLE"],
        });
        let result = auth
            .authenticate(&evil.sign_with_header(&header, &base()))
            .await;
        let expected = if kid == "evil" {
            AuthError::UnknownKey
        } else {
            AuthError::BadSignature
        };
        assert_eq!(result, Err(expected), "kid {kid}");
    }
    // jku alone, without kid: the only configured key is used, and it does not verify.
    let header = json!({"alg": "RS256", "jku": attacker.url()});
    assert_eq!(
        auth.authenticate(&evil.sign_with_header(&header, &base()))
            .await,
        Err(AuthError::BadSignature)
    );
    assert_eq!(
        attacker.requests(),
        0,
        "the attacker's server was contacted"
    );
    // The configured server: start + one refetch for the unknown kid.
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn unknown_kids_cost_at_most_one_fetch_per_hold_off() {
    let key = rsa_key(0);
    let server = JwksServer::start(&[key]).await;
    let auth = jwks_auth(&server, &[Algorithm::RS256], None, &[]).await;
    assert_eq!(server.requests(), 1);
    let stranger = TestKey::rsa(Algorithm::RS256, "stranger");
    let start = Instant::now();
    assert_eq!(
        auth.authenticate(&stranger.sign(&base())).await,
        Err(AuthError::UnknownKey)
    );
    assert!(
        start.elapsed() < HOLD_OFF / 2,
        "the first refetch is at once"
    );
    assert_eq!(server.requests(), 2, "one refetch for the unknown kid");
    // Inside the hold-off, each unknown kid waits for the next permitted
    // fetch: one per hold-off, never more.
    let start = Instant::now();
    for i in 0..3 {
        let other =
            rsa_key(1).sign_with_header(&json!({"alg": "RS256", "kid": format!("k{i}")}), &base());
        let asked = Instant::now();
        assert_eq!(auth.authenticate(&other).await, Err(AuthError::UnknownKey));
        assert!(
            asked.elapsed() <= HOLD_OFF + Duration::from_millis(500),
            "waited {:?}",
            asked.elapsed()
        );
    }
    assert!(start.elapsed() >= HOLD_OFF * 3 - Duration::from_millis(100));
    assert_eq!(server.requests(), 5, "one fetch per hold-off");
    assert!(auth.authenticate(&key.sign(&base())).await.is_ok());
    assert_eq!(server.requests(), 5);
}

#[tokio::test]
async fn concurrent_unknown_kids_share_one_fetch() {
    let key = rsa_key(0);
    let server = JwksServer::start(&[key]).await;
    let auth = jwks_auth(&server, &[Algorithm::RS256], None, &[]).await;
    server.set_behavior(Behavior::Delay(Duration::from_millis(300)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let auth = auth.clone();
        let token = rsa_key(1)
            .sign_with_header(&json!({"alg": "RS256", "kid": format!("new-{i}")}), &base());
        tasks.push(tokio::spawn(async move { auth.authenticate(&token).await }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task"), Err(AuthError::UnknownKey));
    }
    // The first fetch at once; callers that came while it was under way wait
    // for the next one, which they all share.
    assert!(
        (2..=3).contains(&server.requests()),
        "{} fetches",
        server.requests()
    );
    assert!(start.elapsed() < HOLD_OFF + Duration::from_millis(1500));
}

#[tokio::test]
async fn requests_waiting_for_a_refetch_are_bounded() {
    use gridgate::gate::jwks::MAX_REFETCH_WAITERS;
    let key = rsa_key(0);
    let server = JwksServer::start(&[key]).await;
    let mut source = jwks(&[server.url()]);
    source.min_refetch_interval = Duration::from_secs(2);
    let auth = JwtAuthenticator::new(settings(vec![provider(
        "idp",
        None,
        &[Algorithm::RS256],
        KeySource::Jwks(source),
        &[],
    )]))
    .expect("config");
    auth.start().await;
    // An unknown kid starts the hold-off.
    let unknown =
        |kid: String| unsigned_token(&json!({"alg": "RS256", "kid": kid}), &base(), "c2ln");
    assert_eq!(
        auth.authenticate(&unknown("first".into())).await,
        Err(AuthError::UnknownKey)
    );
    let extra = 50;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..MAX_REFETCH_WAITERS + extra {
        let auth = auth.clone();
        let token = unknown(format!("flood-{i}"));
        tasks.push(tokio::spawn(async move {
            let result = auth.authenticate(&token).await;
            (result, Instant::now())
        }));
    }
    let mut at_once = 0;
    for task in tasks {
        let (result, done) = task.await.expect("task");
        assert_eq!(result, Err(AuthError::UnknownKey));
        if done.duration_since(start) < Duration::from_secs(1) {
            at_once += 1;
        }
    }
    assert_eq!(at_once, extra, "beyond the bound, refused at once");
    assert_eq!(
        server.requests(),
        3,
        "start, the first, one shared by the waiters"
    );
}

#[tokio::test]
async fn missing_kid() {
    let a = rsa_key(0);
    let b = rsa_key(1);
    let ec = TestKey::ec(Algorithm::ES256, "ec");
    let no_kid = json!({"alg": "RS256", "typ": "JWT"});
    // One key: a token without kid is verified with it.
    let server = JwksServer::start(&[a]).await;
    let auth = jwks_auth(&server, &[Algorithm::RS256, Algorithm::ES256], None, &[]).await;
    assert!(auth
        .authenticate(&a.sign_with_header(&no_kid, &base()))
        .await
        .is_ok());
    assert_eq!(
        auth.authenticate(&b.sign_with_header(&no_kid, &base()))
            .await,
        Err(AuthError::BadSignature)
    );
    // Two RSA keys: ambiguous.
    let server = JwksServer::start(&[a, b]).await;
    let auth = jwks_auth(&server, &[Algorithm::RS256, Algorithm::ES256], None, &[]).await;
    assert_eq!(
        auth.authenticate(&a.sign_with_header(&no_kid, &base()))
            .await,
        Err(AuthError::AmbiguousKey)
    );
    // One RSA and one EC key: only one can verify RS256.
    let server = JwksServer::start(&[a, &ec]).await;
    let auth = jwks_auth(&server, &[Algorithm::RS256, Algorithm::ES256], None, &[]).await;
    assert!(auth
        .authenticate(&a.sign_with_header(&no_kid, &base()))
        .await
        .is_ok());
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn very_long_kid_is_refused_without_refetch() {
    let key = rsa_key(0);
    let server = JwksServer::start(&[key]).await;
    let auth = jwks_auth(&server, &[Algorithm::RS256], None, &[]).await;
    let long = "k".repeat(300);
    let token = key.sign_with_header(&json!({"alg": "RS256", "kid": long}), &base());
    assert_eq!(auth.authenticate(&token).await, Err(AuthError::KidTooLong));
    assert_eq!(server.requests(), 1);
    // Secret providers refuse it too.
    let hmac = hs256();
    let token = hmac.sign_with_header(&json!({"alg": "HS256", "kid": "k".repeat(257)}), &base());
    assert_eq!(
        secret_auth(&hmac).authenticate(&token).await,
        Err(AuthError::KidTooLong)
    );
}

#[tokio::test]
async fn key_set_entries_not_for_signatures_are_ignored() {
    let enc = TestKey::rsa(Algorithm::RS256, "enc");
    let mut enc_jwk = enc.jwk();
    enc_jwk["use"] = json!("enc");
    let other_alg = TestKey::rsa(Algorithm::RS256, "rs512");
    let mut other_alg_jwk = other_alg.jwk();
    other_alg_jwk["alg"] = json!("RS512");
    let verify_only = rsa_key(2);
    let mut ops_jwk = verify_only.jwk();
    ops_jwk["key_ops"] = json!(["encrypt"]);
    let hmac = TestKey::hmac(Algorithm::HS256, &random_bytes(32)).with_kid(Some("oct"));
    let good = rsa_key(0);
    let server = JwksServer::start_with_document(json!({
        "keys": [enc_jwk, other_alg_jwk, ops_jwk, hmac.jwk(), {"kty": "unknown", "kid": "u"}, good.jwk()]
    }))
    .await;
    let auth = jwks_auth(&server, &[Algorithm::RS256], None, &[]).await;
    assert!(auth.ready());
    assert!(auth.authenticate(&good.sign(&base())).await.is_ok());
    for key in [&enc, &other_alg, verify_only] {
        assert_eq!(
            auth.authenticate(&key.sign(&base())).await,
            Err(AuthError::UnknownKey),
            "{:?}",
            key.kid
        );
    }
    // The `oct` JWK is not a key: an HS256 token naming it is refused.
    assert_eq!(
        auth.authenticate(&hmac.sign(&base())).await,
        Err(AuthError::AlgorithmNotAllowed)
    );
}

#[tokio::test]
async fn time_claims() {
    let key = hs256();
    let mut config = settings(vec![provider(
        "default",
        None,
        &[Algorithm::HS256],
        KeySource::Secret(key.secret().to_vec()),
        &[],
    )]);
    config.max_lifetime = Some(Duration::from_secs(3600));
    config.cache_capacity = 0;
    let auth = JwtAuthenticator::new(config).expect("config");
    let t = now();
    let cases: Vec<(Value, Result<(), AuthError>)> = vec![
        (json!({}), Ok(())),
        (json!({"exp": t - 120}), Err(AuthError::Expired)),
        (json!({"exp": t - 30}), Ok(())),
        (json!({"nbf": t + 300}), Err(AuthError::NotYetValid)),
        (json!({"nbf": t + 30}), Ok(())),
        (json!({"exp": null}), Err(AuthError::NoExpiry)),
        (json!({"iat": t + 300}), Err(AuthError::IssuedInFuture)),
        (json!({"iat": t + 30}), Ok(())),
        (
            json!({"iat": "yesterday"}),
            Err(AuthError::InvalidClaim("iat")),
        ),
        (json!({"nbf": "now"}), Err(AuthError::InvalidClaim("nbf"))),
        (json!({"exp": t + 7200}), Err(AuthError::LifetimeExceeded)),
        (
            json!({"iat": null, "exp": t + 7200}),
            Err(AuthError::LifetimeExceeded),
        ),
        (
            json!({"iat": null, "nbf": null, "exp": t + 7200}),
            Err(AuthError::LifetimeExceeded),
        ),
        (json!({"iat": null, "nbf": null, "exp": t + 1800}), Ok(())),
        (json!({"exp": (t + 600) as f64 + 0.5}), Ok(())),
    ];
    for (changes, expected) in cases {
        let token = key.sign(&with(base(), changes.clone()));
        let result = auth.authenticate(&token).await.map(|_| ());
        assert_eq!(result, expected, "{changes}");
    }
    // `exp` of the wrong type or range: refused, whatever the reason.
    for exp in [
        json!("9999999999"),
        json!(-5),
        json!(1e30),
        json!(true),
        json!([t + 60]),
    ] {
        let token = key.sign(&with(base(), json!({"exp": exp})));
        let result = auth.authenticate(&token).await;
        assert!(
            matches!(
                result,
                Err(AuthError::NoExpiry | AuthError::InvalidClaim("exp") | AuthError::Malformed)
            ),
            "{exp}: {result:?}"
        );
    }
    // A huge exp is within the lifetime cap only without one.
    let token = key.sign(&with(base(), json!({"exp": u64::MAX})));
    assert_eq!(
        auth.authenticate(&token).await,
        Err(AuthError::LifetimeExceeded)
    );
    let unlimited = secret_auth(&key);
    assert!(unlimited.authenticate(&token).await.is_ok());
    assert!(unlimited.authenticate(&token).await.is_ok(), "cached");
}

#[tokio::test]
async fn audiences() {
    let key = hs256();
    let auth = JwtAuthenticator::new(settings(vec![provider(
        "default",
        None,
        &[Algorithm::HS256],
        KeySource::Secret(key.secret().to_vec()),
        &["gate", "gate2"],
    )]))
    .expect("config");
    let cases: Vec<(Value, Result<(), AuthError>)> = vec![
        (json!("gate"), Ok(())),
        (json!(["other", "gate2"]), Ok(())),
        (json!("other"), Err(AuthError::AudienceMismatch)),
        (json!(["other"]), Err(AuthError::AudienceMismatch)),
        (json!([]), Err(AuthError::AudienceMismatch)),
        (Value::Null, Err(AuthError::MissingAudience)),
        (json!(42), Err(AuthError::MissingAudience)),
    ];
    for (aud, expected) in cases {
        let token = key.sign(&with(base(), json!({"aud": aud.clone()})));
        let result = auth.authenticate(&token).await.map(|_| ());
        assert_eq!(result, expected, "aud {aud}");
    }
}

#[tokio::test]
async fn issuers() {
    let a = hs256();
    let b = hs256();
    let auth = JwtAuthenticator::new(settings(vec![
        provider(
            "a",
            Some("https://a"),
            &[Algorithm::HS256],
            KeySource::Secret(a.secret().to_vec()),
            &[],
        ),
        provider(
            "b",
            Some("https://b"),
            &[Algorithm::HS256],
            KeySource::Secret(b.secret().to_vec()),
            &[],
        ),
    ]))
    .expect("config");
    let iss = |i: Value| with(base(), json!({"iss": i}));
    assert!(auth
        .authenticate(&a.sign(&iss(json!("https://a"))))
        .await
        .is_ok());
    assert!(auth
        .authenticate(&b.sign(&iss(json!("https://b"))))
        .await
        .is_ok());
    assert_eq!(
        auth.authenticate(&a.sign(&iss(json!("https://c")))).await,
        Err(AuthError::UnknownIssuer)
    );
    assert_eq!(
        auth.authenticate(&a.sign(&iss(json!("https://a/")))).await,
        Err(AuthError::UnknownIssuer)
    );
    assert_eq!(
        auth.authenticate(&a.sign(&iss(Value::Null))).await,
        Err(AuthError::MissingIssuer)
    );
    assert_eq!(
        auth.authenticate(&b.sign(&iss(json!("https://a")))).await,
        Err(AuthError::BadSignature),
        "issuer a's token signed with b's key"
    );
    assert_eq!(
        auth.authenticate(&a.sign(&iss(json!(["https://a"])))).await,
        Err(AuthError::Malformed)
    );
    // One provider with an issuer: other issuers are unknown, `iss` is required.
    let single = JwtAuthenticator::new(settings(vec![provider(
        "a",
        Some("https://a"),
        &[Algorithm::HS256],
        KeySource::Secret(a.secret().to_vec()),
        &[],
    )]))
    .expect("config");
    assert!(single
        .authenticate(&a.sign(&iss(json!("https://a"))))
        .await
        .is_ok());
    assert_eq!(
        single.authenticate(&a.sign(&iss(json!("https://b")))).await,
        Err(AuthError::UnknownIssuer)
    );
    assert_eq!(
        single.authenticate(&a.sign(&iss(Value::Null))).await,
        Err(AuthError::MissingIssuer)
    );
    // BuildGrid style (no issuer): `iss` is not checked.
    let default = secret_auth(&a);
    assert!(default
        .authenticate(&a.sign(&iss(json!("anything"))))
        .await
        .is_ok());
    assert!(default
        .authenticate(&a.sign(&iss(Value::Null)))
        .await
        .is_ok());
}

#[tokio::test]
async fn critical_header_parameters_are_refused() {
    let key = hs256();
    let auth = secret_auth(&key);
    for crit in [json!(["exp"]), json!(["b64"]), json!("b64")] {
        let header = json!({"alg": "HS256", "crit": crit, "exp": now() + 60, "b64": false});
        assert_eq!(
            auth.authenticate(&key.sign_with_header(&header, &base()))
                .await,
            Err(AuthError::CriticalHeader)
        );
    }
    let header = json!({"alg": "HS256", "crit": []});
    assert_eq!(
        auth.authenticate(&key.sign_with_header(&header, &base()))
            .await,
        Err(AuthError::Malformed)
    );
}

#[tokio::test]
async fn malformed_tokens_never_panic() {
    let key = hs256();
    let auth = secret_auth(&key);
    let good = key.sign(&base());
    let (head, rest) = good.split_once('.').expect("dot");
    let (payload, signature) = rest.split_once('.').expect("dot");
    let nested = format!("{{\"a\":{}{}}}", "[".repeat(5000), "]".repeat(5000));
    let cases: Vec<String> = vec![
        String::new(),
        "x".into(),
        ".".into(),
        "..".into(),
        "...".into(),
        format!("{head}.{payload}"),
        format!("{head}.{payload}.{signature}.{signature}"),
        format!("{head}.{payload}.{signature}.{payload}.{signature}"),
        format!("{head}.{payload}."),
        format!(".{payload}.{signature}"),
        format!("{head}..{signature}"),
        format!("{head}=.{payload}.{signature}"),
        format!("{head}.{payload}.{signature}="),
        format!("Bearer {good}"),
        format!("bearer {good}"),
        format!("{good}\n"),
        format!(" {good}"),
        format!("{head}.!!!!.{signature}"),
        format!("{}.{payload}.{signature}", b64url("not json")),
        format!("{}.{payload}.{signature}", b64url("{\"typ\":\"JWT\"}")),
        format!("{}.{payload}.{signature}", b64url("[\"HS256\"]")),
        format!("{head}.{}.{signature}", b64url("[1,2,3]")),
        format!("{head}.{}.{signature}", b64url("null")),
        key.sign_raw("{\"alg\":\"HS256\"}", "[1,2,3]"),
        key.sign_raw("{\"alg\":\"HS256\"}", "\"just a string\""),
        key.sign_raw("{\"alg\":\"HS256\"}", &nested),
        key.sign_raw(
            &format!(
                "{{\"alg\":\"HS256\",\"x\":{}{}}}",
                "[".repeat(3000),
                "]".repeat(3000)
            ),
            &base().to_string(),
        ),
        key.sign_raw(
            "{\"alg\":\"HS256\"}",
            "{\"exp\":99999999999,\"sub\":\"\\ud800\"}",
        ),
        key.sign_raw(
            "{\"alg\":\"HS256\"}",
            "{\"exp\":99999999999,\"sub\":\"a\"} trailing",
        ),
        key.sign_raw("{\"alg\":\"HS256\"}", "{\"exp\":1e999}"),
        key.sign_raw("{\"alg\":\"HS256\",\"alg\":\"none\"}", &base().to_string()),
        key.sign_raw(
            "{\"alg\":\"HS256\",\"kid\":\"a\",\"kid\":\"b\"}",
            &base().to_string(),
        ),
        key.sign_raw("{\"alg\":\"HS256\",\"kid\":5}", &base().to_string()),
        key.sign_raw("{\"alg\":null}", &base().to_string()),
        key.sign_raw(
            "{\"alg\":\"HS256\"}",
            "{\"sub\":\"alice\",\"sub\":\"admin\",\"exp\":99999999999}",
        ),
        key.sign_raw("{\"alg\":\"HS256\"}", "{\"exp\":1,\"exp\":99999999999}"),
        key.sign_raw(
            "{\"alg\":\"HS256\"}",
            "{\"exp\":99999999999,\"act\":{\"sub\":\"a\",\"sub\":\"b\"}}",
        ),
    ];
    for token in &cases {
        let result = auth.authenticate(token).await;
        assert!(result.is_err(), "accepted {token:?}");
        assert_ne!(result, Err(AuthError::TooLarge));
    }
    // Duplicate names are malformed, not merely refused.
    assert_eq!(
        auth.authenticate(&key.sign_raw(
            "{\"alg\":\"HS256\"}",
            "{\"sub\":\"alice\",\"sub\":\"admin\",\"exp\":99999999999}"
        ))
        .await,
        Err(AuthError::Malformed)
    );
    // Every truncation and every single-character change of a valid token.
    assert!(auth.authenticate(&good).await.is_ok());
    for end in 0..good.len() {
        assert!(
            auth.authenticate(&good[..end]).await.is_err(),
            "prefix {end}"
        );
    }
    let alphabet = ['A', 'B', 'a', '0', '-', '_', '.', '='];
    for i in 0..good.len() {
        for c in alphabet {
            let mut bytes = good.clone().into_bytes();
            if bytes[i] == c as u8 {
                continue;
            }
            bytes[i] = c as u8;
            let token = String::from_utf8(bytes).expect("ascii");
            assert!(
                auth.authenticate(&token).await.is_err(),
                "changed {i} to {c}"
            );
        }
    }
}

#[tokio::test]
async fn token_size_limits() {
    let key = hs256();
    let auth = secret_auth(&key);
    // A token near 16 KiB is accepted.
    let mut claims = base();
    let mut token = key.sign(&claims);
    let pad = MAX_TOKEN_BYTES - token.len() - 200;
    claims["padding"] = json!("p".repeat(pad * 3 / 4));
    token = key.sign(&claims);
    assert!(
        token.len() <= MAX_TOKEN_BYTES && token.len() > MAX_TOKEN_BYTES - 400,
        "{}",
        token.len()
    );
    assert!(auth.authenticate(&token).await.is_ok());
    // Just over, and 1 MiB: refused before parsing.
    claims["padding"] = json!("p".repeat(MAX_TOKEN_BYTES * 3 / 4));
    let over = key.sign(&claims);
    assert!(over.len() > MAX_TOKEN_BYTES);
    assert_eq!(auth.authenticate(&over).await, Err(AuthError::TooLarge));
    let huge = "A".repeat(1024 * 1024);
    assert_eq!(auth.authenticate(&huge).await, Err(AuthError::TooLarge));
    let huge_dots = format!(
        "{}.{}.{}",
        "A".repeat(400_000),
        "B".repeat(400_000),
        "C".repeat(400_000)
    );
    assert_eq!(
        auth.authenticate(&huge_dots).await,
        Err(AuthError::TooLarge)
    );
}

// ---------------------------------------------------------------- identity

#[tokio::test]
async fn identity_mapping() {
    let key = hs256();
    let auth = JwtAuthenticator::new(settings(vec![provider(
        "default",
        None,
        &[Algorithm::HS256],
        KeySource::Secret(key.secret().to_vec()),
        &["instance-a", "instance-b"],
    )]))
    .expect("config");
    let cases = [
        (
            json!({"act": "bob"}),
            Some("bob"),
            Some("alice"),
            Some("gate-x"),
        ),
        (
            json!({"act": {"sub": "svc", "act": {"sub": "older"}}}),
            Some("svc"),
            Some("alice"),
            Some("gate-x"),
        ),
        (
            json!({"act": null}),
            Some("alice"),
            Some("alice"),
            Some("gate-x"),
        ),
        (
            json!({"act": {"iss": "no sub"}}),
            Some("alice"),
            Some("alice"),
            Some("gate-x"),
        ),
        (
            json!({"aud": ["instance-b", "instance-a"]}),
            Some("alice"),
            Some("alice"),
            Some("instance-b"),
        ),
        (json!({"sub": null}), None, None, Some("gate-x")),
        (json!({"sub": 42}), Some("42"), Some("42"), Some("gate-x")),
    ];
    for (changes, actor, subject, workflow) in cases {
        let claims = with(
            with(base(), json!({"aud": ["gate-x", "instance-a"]})),
            changes.clone(),
        );
        let identity = auth.authenticate(&key.sign(&claims)).await.expect("valid");
        assert_eq!(identity.actor.as_deref(), actor, "{changes}");
        assert_eq!(identity.subject.as_deref(), subject, "{changes}");
        assert_eq!(identity.workflow.as_deref(), workflow, "{changes}");
    }
    // Custom claims; without the workflow claim, the first configured audience.
    let mut config = settings(vec![provider(
        "default",
        None,
        &[Algorithm::HS256],
        KeySource::Secret(key.secret().to_vec()),
        &["instance-a"],
    )]);
    config.claims = ClaimMapping {
        actor: vec!["actor".into(), "sub".into()],
        subject: vec!["repository_id".into()],
        workflow: vec!["workflow".into()],
    };
    let custom = JwtAuthenticator::new(config).expect("config");
    let claims = with(
        base(),
        json!({"actor": "octocat", "repository_id": "123", "aud": "instance-a", "workflow": "ci.yml"}),
    );
    let identity = custom
        .authenticate(&key.sign(&claims))
        .await
        .expect("valid");
    assert_eq!(identity.actor.as_deref(), Some("octocat"));
    assert_eq!(identity.subject.as_deref(), Some("123"));
    assert_eq!(identity.workflow.as_deref(), Some("ci.yml"));
    assert_eq!(
        identity.field_values("claim:repository_id"),
        vec!["123".to_owned()]
    );
    let identity = custom
        .authenticate(&key.sign(&with(claims, json!({"workflow": null}))))
        .await
        .expect("valid");
    assert_eq!(identity.workflow.as_deref(), Some("instance-a"));
}

// ---------------------------------------------------------------- key sets

#[tokio::test]
async fn key_rotation_without_restart() {
    let old = rsa_key(0);
    let new = rsa_key(1);
    let server = JwksServer::start(&[old]).await;
    let auth = jwks_auth(&server, &[Algorithm::RS256], None, &[]).await;
    assert!(auth.authenticate(&old.sign(&base())).await.is_ok());
    server.set_keys(&[old, new]);
    let started = Instant::now();
    assert!(auth.authenticate(&new.sign(&base())).await.is_ok());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.requests(), 2);
    assert!(auth.authenticate(&old.sign(&base())).await.is_ok());
}

#[tokio::test]
async fn cached_keys_survive_a_key_set_outage() {
    let key = rsa_key(0);
    let server = JwksServer::start(&[key]).await;
    let mut source = jwks(&[server.url()]);
    source.refresh = Duration::from_millis(100);
    let mut config = settings(vec![provider(
        "idp",
        None,
        &[Algorithm::RS256],
        KeySource::Jwks(source),
        &[],
    )]);
    config.cache_capacity = 0; // verify every time
    let auth = JwtAuthenticator::new(config).expect("config");
    auth.start().await;
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(auth.ready());
    assert!(auth.authenticate(&key.sign(&base())).await.is_ok());
    for behavior in [
        Behavior::Status(500),
        Behavior::Garbage,
        Behavior::Empty,
        Behavior::Status(404),
    ] {
        server.set_behavior(behavior.clone());
        server.restart().await;
        let seen = server.requests();
        assert!(
            server
                .wait_for_requests(seen + 2, Duration::from_secs(5))
                .await,
            "{behavior:?}"
        );
        assert!(auth.ready(), "{behavior:?}");
        assert!(
            auth.authenticate(&key.sign(&base())).await.is_ok(),
            "{behavior:?}"
        );
    }
}

#[tokio::test]
async fn failing_key_set_at_start_then_recovering() {
    let key = rsa_key(0);
    for behavior in [
        Behavior::Status(500),
        Behavior::Garbage,
        Behavior::Empty,
        Behavior::Hang,
    ] {
        let server = JwksServer::start(&[key]).await;
        server.set_behavior(behavior.clone());
        let mut source = jwks(&[server.url()]);
        source.refresh = Duration::from_millis(200);
        source.timeout = Duration::from_millis(300);
        let auth = JwtAuthenticator::new(settings(vec![provider(
            "idp",
            None,
            &[Algorithm::RS256],
            KeySource::Jwks(source),
            &[],
        )]))
        .expect("config");
        let mut ready = auth.subscribe_ready();
        assert!(!*ready.borrow());
        auth.start().await;
        assert!(!auth.ready(), "{behavior:?}");
        assert_eq!(
            auth.authenticate(&key.sign(&base())).await,
            Err(AuthError::NoKeys),
            "{behavior:?}"
        );
        server.set_behavior(Behavior::Serve);
        tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r))
            .await
            .unwrap_or_else(|_| panic!("{behavior:?}: never ready"))
            .expect("watch");
        assert!(auth.ready());
        assert!(
            auth.authenticate(&key.sign(&base())).await.is_ok(),
            "{behavior:?}"
        );
    }
}

#[tokio::test]
async fn unreachable_key_set_at_start() {
    // A port nobody listens on.
    let server = JwksServer::start(&[rsa_key(0)]).await;
    let url = server.url();
    server.stop().await;
    let auth = JwtAuthenticator::new(settings(vec![provider(
        "idp",
        None,
        &[Algorithm::RS256],
        KeySource::Jwks(jwks(&[url])),
        &[],
    )]))
    .expect("config");
    auth.start().await;
    assert!(!auth.ready());
    assert_eq!(
        auth.authenticate(&rsa_key(0).sign(&base())).await,
        Err(AuthError::NoKeys)
    );
    // Back up: the refresh task (1 s after the failure) or the next refetch brings keys.
    server.restart().await;
    assert!(
        until(Duration::from_secs(5), || async { auth.ready() }).await,
        "never ready"
    );
    assert!(auth.authenticate(&rsa_key(0).sign(&base())).await.is_ok());
}

#[tokio::test]
async fn oversized_key_set_is_refused() {
    let key = rsa_key(0);
    let server = JwksServer::start(&[key]).await;
    let mut big = jwks_server::jwks(&[key]);
    big["padding"] = json!("x".repeat(1024 * 1024 + 10));
    server.set_document(big);
    let auth = jwks_auth(&server, &[Algorithm::RS256], None, &[]).await;
    assert!(!auth.ready());
    assert_eq!(
        auth.authenticate(&key.sign(&base())).await,
        Err(AuthError::NoKeys)
    );
}

#[tokio::test]
async fn max_staleness_drops_old_keys() {
    let key = rsa_key(0);
    let server = JwksServer::start(&[key]).await;
    let mut source = jwks(&[server.url()]);
    source.refresh = Duration::from_millis(200);
    source.max_staleness = Some(Duration::from_secs(1));
    let mut config = settings(vec![provider(
        "idp",
        None,
        &[Algorithm::RS256],
        KeySource::Jwks(source),
        &[],
    )]);
    config.cache_capacity = 0;
    let auth = JwtAuthenticator::new(config).expect("config");
    auth.start().await;
    let token = key.sign(&base());
    assert!(auth.authenticate(&token).await.is_ok());
    let mut ready = auth.subscribe_ready();
    server.set_behavior(Behavior::Status(503));
    let failing_since = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| !*r))
        .await
        .expect("keys never became stale")
        .expect("watch");
    assert!(failing_since.elapsed() >= Duration::from_millis(700));
    assert!(!auth.ready());
    assert_eq!(auth.authenticate(&token).await, Err(AuthError::NoKeys));
    server.set_behavior(Behavior::Serve);
    tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r))
        .await
        .expect("never ready again")
        .expect("watch");
    assert!(auth.authenticate(&token).await.is_ok());
}

#[tokio::test]
async fn cache_hits_and_revocation_by_key_removal() {
    let a = rsa_key(0);
    let b = rsa_key(1);
    let c = rsa_key(2);
    let server = JwksServer::start(&[a, b]).await;
    let auth = jwks_auth(&server, &[Algorithm::RS256], None, &[]).await;
    let token = a.sign(&base());
    let first = auth.authenticate(&token).await.expect("valid");
    assert_eq!(auth.cache_stats(), (0, 1));
    let second = auth.authenticate(&token).await.expect("cached");
    assert_eq!(first, second);
    assert_eq!(auth.cache_stats(), (1, 1));
    // Key `a` leaves the set; the next fetch (here on demand, for the new key `c`) sees it.
    server.set_keys(&[b, c]);
    assert!(auth.authenticate(&c.sign(&base())).await.is_ok());
    assert_eq!(auth.authenticate(&token).await, Err(AuthError::UnknownKey));
    assert_eq!(auth.cache_stats().0, 1, "no hit for the revoked token");
    // The same through the periodic refresh.
    let server = JwksServer::start(&[a, b]).await;
    let mut source = jwks(&[server.url()]);
    source.refresh = Duration::from_millis(100);
    let auth = JwtAuthenticator::new(settings(vec![provider(
        "idp",
        None,
        &[Algorithm::RS256],
        KeySource::Jwks(source),
        &[],
    )]))
    .expect("config");
    auth.start().await;
    let token = b.sign(&base());
    assert!(auth.authenticate(&token).await.is_ok());
    assert!(auth.authenticate(&token).await.is_ok());
    assert_eq!(auth.cache_stats(), (1, 1));
    server.set_keys(&[a]);
    assert!(
        until(Duration::from_secs(5), || async {
            auth.authenticate(&token).await == Err(AuthError::UnknownKey)
        })
        .await
    );
}

#[tokio::test]
async fn cached_tokens_expire_with_the_token() {
    let key = hs256();
    let mut config = settings(vec![provider(
        "default",
        None,
        &[Algorithm::HS256],
        KeySource::Secret(key.secret().to_vec()),
        &[],
    )]);
    config.leeway = Duration::ZERO;
    let auth = JwtAuthenticator::new(config).expect("config");
    let token = key.sign(&with(base(), json!({"exp": now() + 2})));
    assert!(auth.authenticate(&token).await.is_ok());
    assert!(auth.authenticate(&token).await.is_ok());
    assert_eq!(auth.cache_stats(), (1, 1));
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(auth.authenticate(&token).await, Err(AuthError::Expired));
}

#[tokio::test]
async fn two_providers_side_by_side() {
    let github_key = rsa_key(0);
    let gitlab_key = rsa_key(1);
    let gitlab_ec = TestKey::ec(Algorithm::ES256, "gitlab-ec");
    let github = JwksServer::start(&[github_key]).await;
    let gitlab = JwksServer::start(&[gitlab_key, &gitlab_ec]).await;
    let auth = JwtAuthenticator::new(settings(vec![
        provider(
            "github",
            Some(GITHUB),
            &[Algorithm::RS256],
            KeySource::Jwks(jwks(&[github.url()])),
            &["https://github.com/example-org"],
        ),
        provider(
            "gitlab",
            Some(GITLAB),
            &[Algorithm::RS256, Algorithm::ES256],
            KeySource::Jwks(jwks(&[gitlab.url()])),
            &["gridgate"],
        ),
    ]))
    .expect("config");
    assert!(!auth.ready(), "not ready before the first fetch");
    auth.start().await;
    assert!(auth.ready());
    let t = now();
    let github_claims = json!({
        "iss": GITHUB, "aud": "https://github.com/example-org",
        "sub": "repo:example-org/app:ref:refs/heads/main",
        "actor": "octocat", "repository": "example-org/app", "repository_id": "123456",
        "ref": "refs/heads/main", "ref_protected": "true", "event_name": "push",
        "iat": t, "nbf": t - 300, "exp": t + 6 * 3600,
    });
    let identity = auth
        .authenticate(&github_key.sign(&github_claims))
        .await
        .expect("github");
    assert_eq!(
        identity.subject.as_deref(),
        Some("repo:example-org/app:ref:refs/heads/main")
    );
    assert_eq!(
        identity.workflow.as_deref(),
        Some("https://github.com/example-org")
    );
    assert_eq!(
        identity.field_values("claim:ref_protected"),
        vec!["true".to_owned()]
    );
    let gitlab_claims = json!({
        "iss": GITLAB, "aud": "gridgate",
        "sub": "project_path:group/project:ref_type:branch:ref:main",
        "namespace_path": "group", "project_path": "group/project", "project_id": "42",
        "pipeline_source": "push", "ref_protected": true,
        "iat": t, "nbf": t, "exp": t + 300,
    });
    let identity = auth
        .authenticate(&gitlab_key.sign(&gitlab_claims))
        .await
        .expect("gitlab");
    assert_eq!(identity.workflow.as_deref(), Some("gridgate"));
    assert_eq!(
        identity.field_values("claim:ref_protected"),
        vec!["true".to_owned()]
    );
    assert!(auth
        .authenticate(&gitlab_ec.sign(&gitlab_claims))
        .await
        .is_ok());
    // A GitHub-issued token signed with a key of GitLab's set: GitHub's set decides.
    let crossed = json!({"alg": "RS256", "kid": "rsa-1"});
    assert_eq!(
        auth.authenticate(&gitlab_key.sign_with_header(&crossed, &github_claims))
            .await,
        Err(AuthError::UnknownKey)
    );
    // ... and an ES256 token for GitHub, which only allows RS256.
    assert_eq!(
        auth.authenticate(&gitlab_ec.sign(&github_claims)).await,
        Err(AuthError::AlgorithmNotAllowed)
    );
    // GitLab's token with GitHub's audience.
    let wrong_aud = with(
        gitlab_claims.clone(),
        json!({"aud": "https://github.com/example-org"}),
    );
    assert_eq!(
        auth.authenticate(&gitlab_key.sign(&wrong_aud)).await,
        Err(AuthError::AudienceMismatch)
    );
    assert_eq!(
        auth.authenticate(&github_key.sign(&with(github_claims, json!({"iss": "https://evil"}))))
            .await,
        Err(AuthError::UnknownIssuer)
    );
    assert_eq!(
        github.requests(),
        2,
        "start + the refetch for the crossed kid"
    );
    assert_eq!(gitlab.requests(), 1);
}

#[tokio::test]
async fn several_urls_are_merged() {
    let a = rsa_key(0);
    let b = rsa_key(1);
    let one = JwksServer::start(&[a]).await;
    let two = JwksServer::start(&[b]).await;
    let mut source = jwks(&[one.url(), two.url()]);
    source.refresh = Duration::from_millis(100);
    let mut config = settings(vec![provider(
        "idp",
        None,
        &[Algorithm::RS256],
        KeySource::Jwks(source),
        &[],
    )]);
    config.cache_capacity = 0;
    let auth = JwtAuthenticator::new(config).expect("config");
    auth.start().await;
    assert!(auth.authenticate(&a.sign(&base())).await.is_ok());
    assert!(auth.authenticate(&b.sign(&base())).await.is_ok());
    // One URL down, the other serving garbage: both keep their last good keys.
    two.stop().await;
    one.set_behavior(Behavior::Garbage);
    let seen = one.requests();
    assert!(
        one.wait_for_requests(seen + 2, Duration::from_secs(5))
            .await
    );
    assert!(auth.authenticate(&a.sign(&base())).await.is_ok());
    assert!(auth.authenticate(&b.sign(&base())).await.is_ok());
}

#[tokio::test]
async fn refresh_tasks_stop_with_the_authenticator() {
    let server = JwksServer::start(&[rsa_key(0)]).await;
    let mut source = jwks(&[server.url()]);
    source.refresh = Duration::from_millis(50);
    let auth = JwtAuthenticator::new(settings(vec![provider(
        "idp",
        None,
        &[Algorithm::RS256],
        KeySource::Jwks(source),
        &[],
    )]))
    .expect("config");
    auth.start().await;
    auth.start().await; // a second start does nothing
    assert!(server.wait_for_requests(3, Duration::from_secs(5)).await);
    drop(auth);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after_drop = server.requests();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(server.requests(), after_drop);
}

// ---------------------------------------------------------------- configuration

#[tokio::test]
async fn configuration_errors() {
    let rsa = rsa_key(0);
    let pem = || KeySource::PublicKeyPem(rsa.public_pem().as_bytes().to_vec());
    let url = |u: &str| KeySource::Jwks(jwks(&[u.to_owned()]));
    let check = |providers: Vec<ProviderSettings>| JwtAuthenticator::new(settings(providers)).err();

    assert!(matches!(check(vec![]), Some(JwtConfigError::NoProviders)));
    // Weak and empty secrets.
    for (alg, len) in [
        (Algorithm::HS256, 31),
        (Algorithm::HS384, 47),
        (Algorithm::HS512, 63),
    ] {
        let err = check(vec![provider(
            "p",
            None,
            &[alg],
            KeySource::Secret(vec![7; len]),
            &[],
        )]);
        assert!(
            matches!(err, Some(JwtConfigError::WeakSecret { .. })),
            "{alg:?}: {err:?}"
        );
        let text = err.expect("error").to_string();
        assert!(!text.contains("\u{7}"), "secret leaked in {text}");
        let mut weak = provider("p", None, &[alg], KeySource::Secret(vec![7; len]), &[]);
        weak.allow_weak_secret = true;
        let auth = JwtAuthenticator::new(settings(vec![weak])).expect("weak secret allowed");
        let key = TestKey::hmac(alg, &[7; 64][..len]);
        assert!(auth.authenticate(&key.sign(&base())).await.is_ok());
    }
    let err = check(vec![provider(
        "p",
        None,
        &[Algorithm::HS256, Algorithm::HS512],
        KeySource::Secret(vec![1; 40]),
        &[],
    )]);
    assert!(
        matches!(err, Some(JwtConfigError::WeakSecret { minimum: 64, .. })),
        "{err:?}"
    );
    assert!(matches!(
        check(vec![provider(
            "p",
            None,
            &[Algorithm::HS256],
            KeySource::Secret(vec![]),
            &[]
        )]),
        Some(JwtConfigError::EmptySecret { .. })
    ));
    // Algorithm vs key kind.
    for (algs, key) in [
        (vec![Algorithm::RS256], KeySource::Secret(vec![1; 64])),
        (vec![Algorithm::HS256], pem()),
        (vec![Algorithm::RS256, Algorithm::ES256], pem()),
        (vec![Algorithm::HS256], url("https://idp.example/jwks")),
        (
            vec![Algorithm::RS256, Algorithm::HS256],
            url("https://idp.example/jwks"),
        ),
    ] {
        let err = check(vec![provider("p", None, &algs, key, &[])]);
        assert!(
            matches!(err, Some(JwtConfigError::AlgorithmKeyMismatch { .. })),
            "{algs:?}: {err:?}"
        );
    }
    assert!(matches!(
        check(vec![provider("p", None, &[], pem(), &[])]),
        Some(JwtConfigError::NoAlgorithms { .. })
    ));
    // Bad PEMs: garbage, a private key, the wrong curve.
    let ec256 = TestKey::ec(Algorithm::ES256, "e");
    for (alg, bytes) in [
        (Algorithm::RS256, b"not a pem".to_vec()),
        (
            Algorithm::RS256,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_vec(),
        ),
        (Algorithm::ES384, ec256.public_pem().as_bytes().to_vec()),
        (Algorithm::EdDSA, rsa.public_pem().as_bytes().to_vec()),
    ] {
        let err = check(vec![provider(
            "p",
            None,
            &[alg],
            KeySource::PublicKeyPem(bytes),
            &[],
        )]);
        assert!(
            matches!(err, Some(JwtConfigError::BadPublicKey { .. })),
            "{alg:?}: {err:?}"
        );
    }
    // Key set URLs: https, or http to loopback only.
    for ok in [
        "https://idp.example/jwks",
        "http://127.0.0.1:1/jwks",
        "http://[::1]:1/jwks",
        "http://localhost/jwks",
    ] {
        assert!(
            check(vec![provider("p", None, &[Algorithm::RS256], url(ok), &[])]).is_none(),
            "{ok}"
        );
    }
    for bad in [
        "http://idp.example/jwks",
        "http://192.168.1.1/jwks",
        "ftp://127.0.0.1/jwks",
        "jwks.json",
        "",
    ] {
        let err = check(vec![provider(
            "p",
            None,
            &[Algorithm::RS256],
            url(bad),
            &[],
        )]);
        assert!(
            matches!(err, Some(JwtConfigError::Jwks { .. })),
            "{bad}: {err:?}"
        );
    }
    let err = check(vec![provider(
        "p",
        None,
        &[Algorithm::RS256],
        KeySource::Jwks(jwks(&[])),
        &[],
    )]);
    assert!(matches!(err, Some(JwtConfigError::Jwks { .. })), "{err:?}");
    let mut zero = jwks(&["https://idp.example/jwks".to_owned()]);
    zero.refresh = Duration::ZERO;
    let err = check(vec![provider(
        "p",
        None,
        &[Algorithm::RS256],
        KeySource::Jwks(zero),
        &[],
    )]);
    assert!(matches!(err, Some(JwtConfigError::Jwks { .. })), "{err:?}");
    // Several providers: each needs its own issuer.
    let err = check(vec![
        provider("a", Some("https://a"), &[Algorithm::RS256], pem(), &[]),
        provider("b", None, &[Algorithm::RS256], pem(), &[]),
    ]);
    assert!(
        matches!(err, Some(JwtConfigError::IssuerRequired { .. })),
        "{err:?}"
    );
    let err = check(vec![
        provider("a", Some("https://a"), &[Algorithm::RS256], pem(), &[]),
        provider("b", Some("https://a"), &[Algorithm::RS256], pem(), &[]),
    ]);
    assert!(
        matches!(err, Some(JwtConfigError::DuplicateIssuer { .. })),
        "{err:?}"
    );
}

#[test]
fn error_texts_are_short_and_labelled() {
    let all = [
        AuthError::TooLarge,
        AuthError::Malformed,
        AuthError::InvalidClaim("exp"),
        AuthError::AlgorithmNotAllowed,
        AuthError::CriticalHeader,
        AuthError::KidTooLong,
        AuthError::UnknownIssuer,
        AuthError::MissingIssuer,
        AuthError::IssuerMismatch,
        AuthError::UnknownKey,
        AuthError::KeyAlgorithmMismatch,
        AuthError::AmbiguousKey,
        AuthError::NoKeys,
        AuthError::BadSignature,
        AuthError::UnusableKey,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::IssuedInFuture,
        AuthError::NoExpiry,
        AuthError::LifetimeExceeded,
        AuthError::AudienceMismatch,
        AuthError::MissingAudience,
        AuthError::Verification,
    ];
    let mut labels = std::collections::HashSet::new();
    for error in all {
        let text = error.to_string();
        assert!(!text.is_empty() && text.len() < 60, "{text}");
        assert!(
            labels.insert(error.metric_label()),
            "duplicate label {}",
            error.metric_label()
        );
    }
    assert_eq!(AuthError::Expired.to_string(), "token expired");
    assert_eq!(
        AuthError::NoKeys.to_string(),
        "no keys available for issuer"
    );
}

// ---------------------------------------------------------------- performance

/// Run with `cargo test --release -- --ignored --nocapture timings`.
#[tokio::test]
#[ignore]
async fn timings() {
    let hmac = hs256();
    let rsa = rsa_key(0);
    let mut uncached = settings(vec![provider(
        "default",
        None,
        &[Algorithm::HS256],
        KeySource::Secret(hmac.secret().to_vec()),
        &[],
    )]);
    uncached.cache_capacity = 0;
    let hs_uncached = JwtAuthenticator::new(uncached).expect("config");
    let server = JwksServer::start(&[rsa]).await;
    let mut source = jwks(&[server.url()]);
    source.max_staleness = Some(Duration::from_secs(3600));
    let mut config = settings(vec![provider(
        "idp",
        Some("issuer"),
        &[Algorithm::RS256],
        KeySource::Jwks(source),
        &["gate"],
    )]);
    config.cache_capacity = 0;
    let rs_uncached = JwtAuthenticator::new(config).expect("config");
    rs_uncached.start().await;
    let rs_cached = jwks_auth(&server, &[Algorithm::RS256], Some("issuer"), &["gate"]).await;

    let mut claims = base();
    claims["repository"] = json!("example-org/app");
    claims["ref"] = json!("refs/heads/main");
    claims["act"] = json!({"sub": "ci"});
    let hs_token = hmac.sign(&claims);
    let rs_token = rsa.sign(&claims);
    println!(
        "token sizes: HS256 {} bytes, RS256 {} bytes",
        hs_token.len(),
        rs_token.len()
    );

    async fn time(label: &str, n: u32, auth: &JwtAuthenticator, token: &str) {
        for _ in 0..100 {
            auth.authenticate(token).await.expect("valid");
        }
        let start = Instant::now();
        for _ in 0..n {
            auth.authenticate(token).await.expect("valid");
        }
        println!("{label}: {:?} per call", start.elapsed() / n);
    }
    time("HS256 uncached", 20_000, &hs_uncached, &hs_token).await;
    time("RS256 uncached", 5_000, &rs_uncached, &rs_token).await;
    time("RS256 cache hit", 200_000, &rs_cached, &rs_token).await;
}

// ---------------------------------------------------------------- RSA key sizes

#[test]
fn a_1024_bit_rsa_public_key_is_refused_when_the_authenticator_is_built() {
    let err = JwtAuthenticator::new(settings(vec![provider(
        "buildgrid",
        None,
        &[Algorithm::RS256],
        KeySource::PublicKeyPem(RSA_1024_PUBLIC_PEM.as_bytes().to_vec()),
        &[],
    )]))
    .expect_err("refused");
    assert!(matches!(err, JwtConfigError::RsaKeySize { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "provider \"buildgrid\": RSA key of 1024 bits; at least 2048 are needed"
    );
    // A 2048-bit key of the same kind loads.
    assert!(JwtAuthenticator::new(settings(vec![provider(
        "buildgrid",
        None,
        &[Algorithm::RS256],
        KeySource::PublicKeyPem(rsa_key(0).public_pem().as_bytes().to_vec()),
        &[],
    )]))
    .is_ok());
}

#[tokio::test]
async fn a_key_set_with_a_1024_bit_key_still_serves_its_other_keys() {
    let good = rsa_key(0);
    let server =
        JwksServer::start_with_document(json!({"keys": [rsa_1024_jwk("old-1024"), good.jwk()]}))
            .await;
    let auth = jwks_auth(&server, &[Algorithm::RS256], None, &[]).await;
    assert!(auth.ready(), "the 2048-bit key makes the set usable");
    assert!(auth.authenticate(&good.sign(&base())).await.is_ok());
    // The small key was skipped: its kid is unknown.
    let token = rsa_key(1).sign_with_header(&json!({"alg": "RS256", "kid": "old-1024"}), &base());
    assert_eq!(auth.authenticate(&token).await, Err(AuthError::UnknownKey));

    // A set of nothing but the small key has no usable key.
    let small = JwksServer::start_with_document(json!({"keys": [rsa_1024_jwk("old-1024")]})).await;
    let auth = jwks_auth(&small, &[Algorithm::RS256], None, &[]).await;
    assert!(!auth.ready());
}
