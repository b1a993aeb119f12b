//! The Gate end to end: a real server on loopback, real tokens, a real JWKS
//! server over HTTP, real policy files, and real gRPC clients.
//!
//! Health checks are gated here (`open-health: false`) so that an admitted call
//! has a real answer (SERVING); routes without an instance are decided on "".

mod common;
#[path = "common/jwks_server.rs"]
mod jwks_server;

use std::path::Path;
use std::time::Duration;

use common::*;
use jsonwebtoken::Algorithm;
use jwks_server::{claims, now, rsa_1024_jwk, Behavior, JwksServer, TestKey};
use serde_json::json;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const ISS: &str = "https://ci.example";
/// The HS256 secret of most tests (long enough for RFC 7518).
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-hs256";

fn hs_key() -> TestKey {
    TestKey::hmac(Algorithm::HS256, SECRET)
}
const AUD: &str = "gridgate";

/// Health Check with an optional token; Ok(status) or the gRPC error.
async fn check(
    addr: std::net::SocketAddr,
    token: Option<&str>,
) -> Result<ServingStatus, tonic::Status> {
    let mut client = HealthClient::new(plain_channel(addr).await);
    let req = match token {
        Some(t) => with_token(HealthCheckRequest::default(), t),
        None => tonic::Request::new(HealthCheckRequest::default()),
    };
    client.check(req).await.map(|r| r.into_inner().status())
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// A config with HS256 and the given extra authorization keys.
fn hs256_config(dir: &Path, secret: &[u8], auth_extra: &str) -> String {
    std::fs::write(dir.join("hmac.secret"), secret).unwrap();
    loopback_config(
        "",
        &format!(
            "authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  audience: {AUD}\n  open-health: false\n{auth_extra}"
        ),
    )
}

#[tokio::test]
async fn hs256_tokens_and_the_status_codes_of_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let key = hs_key();
    let server = TestServer::start(&hs256_config(dir.path(), key.secret(), ""), dir.path()).await;
    let addr = server.tcp();

    let good = key.sign(&claims(ISS, AUD, "alice"));
    assert_eq!(
        check(addr, Some(&good)).await.unwrap(),
        ServingStatus::Serving
    );

    let err = check(addr, None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("no credentials"), "{err:?}");

    let refusals: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            key.sign(&json!({"aud": AUD, "sub": "a", "exp": now() - 3600, "iat": now() - 7200})),
            "expired",
        ),
        (
            "future nbf",
            key.sign(&json!({"aud": AUD, "sub": "a", "exp": now() + 3600, "nbf": now() + 1800})),
            "not yet valid",
        ),
        (
            "no exp",
            key.sign(&json!({"aud": AUD, "sub": "a"})),
            "expiry",
        ),
        (
            "wrong audience",
            key.sign(&claims(ISS, "someone-else", "a")),
            "audience",
        ),
        (
            "no audience",
            key.sign(&json!({"sub": "a", "exp": now() + 600})),
            "audience",
        ),
        (
            "iat in the future",
            key.sign(&json!({"aud": AUD, "sub": "a", "exp": now() + 7200, "iat": now() + 3600})),
            "future",
        ),
        (
            "other secret",
            TestKey::hmac(Algorithm::HS256, b"another-secret-another-secret-0123")
                .sign(&claims(ISS, AUD, "a")),
            "signature",
        ),
        ("truncated", good[..good.len() - 5].to_string(), ""),
        (
            "two segments",
            good.rsplit_once('.').unwrap().0.to_string(),
            "",
        ),
        ("bad base64", "a$b.c$d.e$f".to_string(), ""),
        (
            "alg none",
            jwks_server::unsigned_token(
                &json!({"alg": "none", "typ": "JWT"}),
                &claims(ISS, AUD, "a"),
                "",
            ),
            "",
        ),
        (
            "alg NoNe",
            jwks_server::unsigned_token(
                &json!({"alg": "NoNe", "typ": "JWT"}),
                &claims(ISS, AUD, "a"),
                "",
            ),
            "",
        ),
        (
            "crit",
            key.sign_with_header(
                &json!({"alg": "HS256", "crit": ["exp"]}),
                &claims(ISS, AUD, "a"),
            ),
            "critical",
        ),
    ];
    for (what, token, expect) in refusals {
        let err = check(addr, Some(&token)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
        assert!(err.message().contains(expect), "{what}: {err:?}");
        assert!(
            !err.message().contains(&token),
            "{what}: the token is echoed"
        );
    }

    // A 1 MiB token: refused, never a panic or a hang (HTTP/2 header limits may
    // refuse it before the Gate sees it).
    let huge = format!("{}.{}.{}", "a".repeat(1 << 20), "b", "c");
    let mut client = HealthClient::new(plain_channel(addr).await);
    let req = with_token(HealthCheckRequest::default(), &huge);
    let err = client.check(req).await.unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    // The server still serves.
    assert_eq!(
        check(addr, Some(&good)).await.unwrap(),
        ServingStatus::Serving
    );

    // Two authorization headers and a non-Bearer scheme are malformed.
    let mut client = HealthClient::new(plain_channel(addr).await);
    let mut req = tonic::Request::new(HealthCheckRequest::default());
    req.metadata_mut()
        .append("authorization", format!("Bearer {good}").parse().unwrap());
    req.metadata_mut()
        .append("authorization", format!("Bearer {good}").parse().unwrap());
    let err = client.check(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut req = tonic::Request::new(HealthCheckRequest::default());
    req.metadata_mut()
        .insert("authorization", format!("Basic {good}").parse().unwrap());
    assert_eq!(
        client.check(req).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // RFC 7235: the scheme is case-insensitive.
    let mut req = tonic::Request::new(HealthCheckRequest::default());
    req.metadata_mut()
        .insert("authorization", format!("bearer {good}").parse().unwrap());
    assert!(client.check(req).await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn weak_hmac_secrets_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = hs256_config(dir.path(), b"short", "");
    let config = gridgate::config::Config::parse(&yaml, "test.yaml", dir.path()).unwrap();
    let err = gridgate::server::Gateway::bind(config)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("secret"), "{err}");

    let yaml = hs256_config(dir.path(), b"short", "  allow-weak-secret: true\n");
    let server = TestServer::start(&yaml, dir.path()).await;
    let key = TestKey::hmac(Algorithm::HS256, b"short");
    let token = key.sign(&claims(ISS, AUD, "legacy"));
    assert_eq!(
        check(server.tcp(), Some(&token)).await.unwrap(),
        ServingStatus::Serving
    );
    server.stop().await;
}

/// A config using a JWKS URL for `alg`.
fn jwks_config(url: &str, alg: &str, auth_extra: &str) -> String {
    loopback_config(
        "",
        &format!(
            "authorization:\n  method: jwt\n  algorithm: {alg}\n  jwks-url: \"{url}\"\n  audience: {AUD}\n  open-health: false\n{auth_extra}"
        ),
    )
}

#[tokio::test]
async fn every_asymmetric_family_from_a_jwks_server() {
    for (key, alg) in [
        (TestKey::rsa(Algorithm::RS256, "rs"), "rs256"),
        (TestKey::rsa(Algorithm::PS256, "ps"), "ps256"),
        (TestKey::ec(Algorithm::ES256, "es"), "es256"),
        (TestKey::ed25519("ed"), "eddsa"),
    ] {
        let jwks = JwksServer::start(&[&key]).await;
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start(&jwks_config(&jwks.url(), alg, ""), dir.path()).await;
        let token = key.sign(&claims(ISS, AUD, "ci"));
        assert_eq!(
            check(server.tcp(), Some(&token)).await.unwrap(),
            ServingStatus::Serving,
            "{alg}"
        );
        // HS256 signed with the public key as the secret: refused.
        let confused = TestKey::hmac(Algorithm::HS256, key.public_pem().as_bytes())
            .with_kid(Some(&format!("{alg}-kid")))
            .sign(&claims(ISS, AUD, "ci"));
        let err = check(server.tcp(), Some(&confused)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{alg}");
        server.stop().await;
    }
}

/// A key set that publishes a 1024-bit key beside a 2048-bit one: the server
/// warns about the small key (URL, kid, size) and serves tokens of the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1024_bit_key_in_a_key_set_is_skipped_with_a_warning() {
    let good = TestKey::rsa(Algorithm::RS256, "current");
    let jwks =
        JwksServer::start_with_document(json!({"keys": [rsa_1024_jwk("legacy-1024"), good.jwk()]}))
            .await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "gridgate.yaml",
        &jwks_config(&jwks.url(), "rs256", ""),
    );
    let mut server = Binary::start(&["serve", "--config", &path]);
    let addr = tokio::task::block_in_place(|| server.listening_addr());
    let warning = tokio::task::block_in_place(|| {
        server.wait_for_line("skipping an RSA key", Duration::from_secs(20))
    })
    .unwrap_or_else(|| panic!("no warning; stderr: {:#?}", server.seen));
    for part in [
        "WARN",
        jwks.url().as_str(),
        "legacy-1024",
        "RSA key of 1024 bits; at least 2048 are needed",
    ] {
        assert!(warning.contains(part), "{part:?} not in {warning}");
    }
    let token = good.sign(&claims(ISS, AUD, "ci"));
    assert_eq!(
        check(addr, Some(&token)).await.unwrap(),
        ServingStatus::Serving
    );
}

#[tokio::test]
async fn pem_public_key_as_secret_like_buildgrid() {
    let key = TestKey::rsa(Algorithm::RS256, "k");
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "key.pem", key.public_pem());
    let yaml = loopback_config(
        "",
        &format!("authorization:\n  method: jwt\n  algorithm: rs256\n  secret: key.pem\n  audience: {AUD}\n  open-health: false\n"),
    );
    let server = TestServer::start(&yaml, dir.path()).await;
    let token = key.sign(&claims(ISS, AUD, "ci"));
    assert_eq!(
        check(server.tcp(), Some(&token)).await.unwrap(),
        ServingStatus::Serving
    );
    server.stop().await;
}

#[tokio::test]
async fn key_rotation_outage_and_injection() {
    let k1 = TestKey::rsa(Algorithm::RS256, "k1");
    let k2 = TestKey::rsa(Algorithm::RS256, "k2");
    let jwks = JwksServer::start(&[&k1]).await;
    let attacker = JwksServer::start(&[&k2]).await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        &jwks_config(&jwks.url(), "rs256", "  jwks-refetch-min-seconds: 1\n"),
        dir.path(),
    )
    .await;
    let addr = server.tcp();
    let t1 = k1.sign(&claims(ISS, AUD, "ci"));
    assert_eq!(
        check(addr, Some(&t1)).await.unwrap(),
        ServingStatus::Serving
    );

    // jku / x5u in a token are never fetched.
    let injected = k2.sign_with_header(
        &json!({"alg": "RS256", "kid": "k2", "jku": attacker.url(), "x5u": attacker.url()}),
        &claims(ISS, AUD, "mallory"),
    );
    let err = check(addr, Some(&injected)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(attacker.requests(), 0, "a URL named by a token was fetched");

    // Rotation: the issuer publishes k2; a k2 token is accepted within a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    jwks.set_keys(&[&k1, &k2]);
    let t2 = k2.sign(&claims(ISS, AUD, "ci"));
    let started = std::time::Instant::now();
    assert_eq!(
        check(addr, Some(&t2)).await.unwrap(),
        ServingStatus::Serving
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // The key server goes down: cached keys keep working.
    jwks.stop().await;
    let t1b = k1.sign(&claims(ISS, AUD, "ci-2"));
    assert_eq!(
        check(addr, Some(&t1b)).await.unwrap(),
        ServingStatus::Serving
    );
    server.stop().await;
}

/// Key rotation inside the refetch hold-off: the issuer publishes a new key
/// right after someone else's unknown kid (perhaps an attacker's) made the
/// gateway fetch; a token signed with the new key waits for the next
/// permitted fetch and is accepted. Also when the new key is published while
/// that fetch is under way and a flood of unknown kids comes with the token:
/// they all share one fetch per hold-off.
#[tokio::test]
async fn a_new_signing_key_is_accepted_inside_the_refetch_hold_off() {
    const HOLD_OFF: Duration = Duration::from_secs(2);
    const SLOW_FETCH: Duration = Duration::from_millis(400);
    let k1 = TestKey::rsa(Algorithm::RS256, "k1");
    let k2 = TestKey::rsa(Algorithm::RS256, "k2");
    let k3 = TestKey::rsa(Algorithm::RS256, "k3");
    let attacker = TestKey::rsa(Algorithm::RS256, "attacker");
    let jwks = JwksServer::start(&[&k1]).await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        &jwks_config(&jwks.url(), "rs256", "  jwks-refetch-min-seconds: 2\n"),
        dir.path(),
    )
    .await;
    let addr = server.tcp();
    let token = |key: &TestKey, kid: &str| {
        key.sign_with_header(&json!({"alg": "RS256", "kid": kid}), &claims(ISS, AUD, kid))
    };
    assert_eq!(
        check(addr, Some(&token(&k1, "k1"))).await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(jwks.requests(), 1);

    // An unknown kid: one fetch at once, then the hold-off.
    let err = check(addr, Some(&token(&attacker, "evil-0")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "unknown signing key");
    assert_eq!(jwks.requests(), 2);
    let fetched = std::time::Instant::now();
    // Right after, the issuer rotates in k2 and a k2 token arrives.
    jwks.set_keys(&[&k1, &k2]);
    let asked = std::time::Instant::now();
    assert_eq!(
        check(addr, Some(&token(&k2, "k2"))).await.unwrap(),
        ServingStatus::Serving
    );
    let waited = asked.elapsed();
    eprintln!("the k2 token waited {waited:?} for the next permitted fetch");
    assert!(
        fetched.elapsed() >= HOLD_OFF - Duration::from_millis(50),
        "fetched again inside the hold-off"
    );
    assert!(
        waited <= HOLD_OFF + Duration::from_millis(500),
        "{waited:?}"
    );
    assert_eq!(jwks.requests(), 3, "one more fetch, after the hold-off");

    // The race: a slow fetch for an attacker's kid is under way when k3 is
    // published; k3's token and 20 more unknown kids arrive meanwhile.
    tokio::time::sleep(HOLD_OFF).await;
    jwks.set_behavior(Behavior::Delay(SLOW_FETCH));
    let first = tokio::spawn({
        let t = token(&attacker, "evil-1");
        async move { check(addr, Some(&t)).await }
    });
    assert!(jwks.wait_for_requests(4, Duration::from_secs(5)).await);
    jwks.set_keys(&[&k1, &k2, &k3]);
    let asked = std::time::Instant::now();
    let mut flood = Vec::new();
    for i in 0..20 {
        let t = token(&attacker, &format!("flood-{i}"));
        flood.push(tokio::spawn(async move { check(addr, Some(&t)).await }));
    }
    let rotated = tokio::spawn({
        let t = token(&k3, "k3");
        async move { check(addr, Some(&t)).await }
    });
    assert_eq!(rotated.await.unwrap().unwrap(), ServingStatus::Serving);
    let waited_race = asked.elapsed();
    eprintln!("the k3 token waited {waited_race:?} (published during a fetch under way)");
    for f in flood {
        let err = f.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert_eq!(err.message(), "unknown signing key");
    }
    let flood_done = asked.elapsed();
    assert!(
        flood_done <= HOLD_OFF + SLOW_FETCH * 2 + Duration::from_millis(500),
        "{flood_done:?}"
    );
    assert_eq!(
        first.await.unwrap().unwrap_err().message(),
        "unknown signing key"
    );
    assert_eq!(jwks.requests(), 5, "the waiters shared one fetch");
    server.stop().await;
}

#[tokio::test]
async fn health_is_not_serving_until_the_first_key_set() {
    let key = TestKey::rsa(Algorithm::RS256, "k1");
    let jwks = JwksServer::start(&[&key]).await;
    jwks.set_behavior(Behavior::Status(500));
    let dir = tempfile::tempdir().unwrap();
    // Health open, so the readiness is visible without a token.
    let yaml = jwks_config(&jwks.url(), "rs256", "  open-health: true\n")
        .replace("  open-health: false\n", "");
    let yaml = yaml.replace("jwks-url", "jwks-fetch-minutes: 1\n  jwks-url");
    let server = TestServer::start(&yaml, dir.path()).await;
    let addr = server.tcp();
    let status = check(addr, None).await.unwrap();
    assert_eq!(status, ServingStatus::NotServing);
    // Tokens are refused while there are no keys.
    let token = key.sign(&claims(ISS, AUD, "ci"));
    let mut client = tonic_health::pb::health_client::HealthClient::new(plain_channel(addr).await);
    let _ = client
        .check(with_token(HealthCheckRequest::default(), &token))
        .await;
    // The key server recovers; an unknown-kid refetch (or the next refresh) brings the keys.
    jwks.set_behavior(Behavior::Serve);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut serving = false;
    while std::time::Instant::now() < deadline {
        // A token triggers a rate-limited refetch for the unknown kid.
        let _ = raw_unary(
            plain_channel(addr).await,
            "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
            bytes::Bytes::new(),
            &[("authorization", format!("Bearer {token}"))],
        )
        .await;
        if check(addr, None).await.unwrap() == ServingStatus::Serving {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        serving,
        "health never became SERVING after the key server recovered"
    );
    server.stop().await;
}

const ACL: &str = r#"
"":
  allow:
    - actor: ci-bot
      subject: repo:org/app:.*
      requests: [Check]
    - subject: admin
team-a:
  allow: all
"#;

#[tokio::test]
async fn buildgrid_acl_rules_and_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "acl.yaml", ACL);
    let key = hs_key();
    let server = TestServer::start(
        &hs256_config(dir.path(), key.secret(), "  acl-config: acl.yaml\n"),
        dir.path(),
    )
    .await;
    let addr = server.tcp();
    let token = |sub: &str, act: Option<&str>| {
        let mut c = claims(ISS, AUD, sub);
        if let Some(a) = act {
            c["act"] = json!(a);
        }
        key.sign(&c)
    };
    // actor regex + subject regex + requests list.
    assert!(
        check(addr, Some(&token("repo:org/app:ref:main", Some("ci-bot"))))
            .await
            .is_ok()
    );
    // Whole-value matching: a longer actor does not match `ci-bot`.
    let err = check(
        addr,
        Some(&token("repo:org/app:ref:main", Some("ci-bot-evil"))),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("no rule allows Check on instance"),
        "{err:?}"
    );
    // actor defaults to sub: "admin" matches the second rule (no requests list = every RPC).
    assert!(check(addr, Some(&token("admin", None))).await.is_ok());
    // A valid token the policy does not admit: PERMISSION_DENIED, not UNAUTHENTICATED.
    let err = check(addr, Some(&token("nobody", None))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    server.stop().await;
}

#[tokio::test]
async fn prefix_matching_is_an_explicit_buildgrid_option() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "acl.yaml",
        "\"\":\n  allow:\n    - actor: prodbuilder\n",
    );
    let key = hs_key();
    let server = TestServer::start(
        &hs256_config(
            dir.path(),
            key.secret(),
            "  acl-config: acl.yaml\n  acl-match: prefix\n",
        ),
        dir.path(),
    )
    .await;
    let evil = key.sign(&claims(ISS, AUD, "prodbuilder-evil"));
    assert!(
        check(server.tcp(), Some(&evil)).await.is_ok(),
        "BuildGrid's re.match admits it"
    );
    server.stop().await;
}

#[tokio::test]
async fn policy_hot_reload_keeps_the_old_policy_on_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    write(&policies, "a.yaml", "\"\":\n  allow:\n    - actor: alice\n");
    let key = hs_key();
    let server = TestServer::start(
        &hs256_config(dir.path(), key.secret(), "  acl-config: policies/\n"),
        dir.path(),
    )
    .await;
    let addr = server.tcp();
    let alice = key.sign(&claims(ISS, AUD, "alice"));
    let bob = key.sign(&claims(ISS, AUD, "bob"));
    assert!(check(addr, Some(&alice)).await.is_ok());
    assert_eq!(
        check(addr, Some(&bob)).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // A second team file adds bob.
    write(&policies, "b.yaml", "\"\":\n  allow:\n    - actor: bob\n");
    let until = |want_ok: bool, token: String| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ok = check(addr, Some(&token)).await.is_ok();
            if ok == want_ok {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert!(until(true, bob.clone()).await, "reload did not admit bob");
    // An invalid file: the previous policy stays in force.
    write(
        &policies,
        "b.yaml",
        "\"\":\n  allow:\n    - actor: [unclosed\n",
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        check(addr, Some(&bob)).await.is_ok(),
        "a bad file must not change the policy"
    );
    assert!(check(addr, Some(&alice)).await.is_ok());
    // Fixed: bob removed.
    write(&policies, "b.yaml", "\"\":\n  allow:\n    - actor: carol\n");
    assert!(until(false, bob).await, "reload did not remove bob");
    server.stop().await;
}

#[tokio::test]
async fn headers_method_for_a_trusted_proxy() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "acl.yaml",
        "\"\":\n  allow:\n    - actor: ci\n      workflow: nightly\n",
    );
    let yaml = loopback_config(
        "",
        "authorization:\n  method: headers\n  acl-config: acl.yaml\n  open-health: false\n",
    );
    let server = TestServer::start(&yaml, dir.path()).await;
    let mut client = HealthClient::new(plain_channel(server.tcp()).await);
    let mut req = tonic::Request::new(HealthCheckRequest::default());
    req.metadata_mut()
        .insert("x-request-actor", "ci".parse().unwrap());
    req.metadata_mut()
        .insert("x-request-workflow", "nightly".parse().unwrap());
    assert!(client.check(req).await.is_ok());
    let mut req = tonic::Request::new(HealthCheckRequest::default());
    req.metadata_mut()
        .insert("x-request-actor", "ci".parse().unwrap());
    assert_eq!(
        client.check(req).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let req = tonic::Request::new(HealthCheckRequest::default());
    assert_eq!(
        client.check(req).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    server.stop().await;
}

#[tokio::test]
async fn client_certificate_identity_alone_or_with_a_token() {
    let certs = Certs::new();
    write(
        certs.dir.path(),
        "acl.yaml",
        "\"\":\n  allow:\n    - cert: { cn: alice, uri: 'spiffe://example\\.org/ci/.*' }\n      requests: [Check]\n",
    );
    let key = hs_key();
    std::fs::write(certs.dir.path().join("hmac.secret"), key.secret()).unwrap();
    let yaml = format!(
        "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n{}authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  acl-config: acl.yaml\n  open-health: false\n",
        certs.credentials_yaml(true)
    );
    let server = TestServer::start(&yaml, certs.dir.path()).await;
    let ch = tls_channel(
        server.tcp(),
        &certs.ca,
        Some((&certs.client_cert, &certs.client_key)),
    )
    .await
    .unwrap();
    // The certificate alone identifies alice.
    assert_eq!(
        health_check(ch.clone()).await.unwrap(),
        ServingStatus::Serving
    );
    // With a token too: the rule still sees the certificate.
    let mut client = HealthClient::new(ch);
    let token = key.sign(&claims(ISS, AUD, "someone"));
    assert!(client
        .check(with_token(HealthCheckRequest::default(), &token))
        .await
        .is_ok());
    server.stop().await;
}

/// A `cert: subject:` rule matches the RFC 4514 subject exactly: a common
/// name made to look like more attributes (`team-b-bot, O=Example` under
/// `O=Evil Corp`) is one escaped value and does not match.
#[tokio::test]
async fn a_subject_rule_is_not_fooled_by_a_common_name_that_looks_like_attributes() {
    use rcgen::DnType::{CommonName, OrganizationName};
    let certs = Certs::new();
    write(
        certs.dir.path(),
        "acl.yaml",
        "\"\":\n  allow:\n    - cert: { subject: 'CN=team-b-bot,O=Example' }\n      requests: [Check]\n",
    );
    let key = hs_key();
    std::fs::write(certs.dir.path().join("hmac.secret"), key.secret()).unwrap();
    let yaml = format!(
        "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n{}authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  acl-config: acl.yaml\n  open-health: false\n",
        certs.credentials_yaml(true)
    );
    let genuine = certs.client_with_subject(
        "team-b-bot",
        &[(OrganizationName, "Example"), (CommonName, "team-b-bot")],
    );
    let forged = certs.client_with_subject(
        "forged",
        &[
            (OrganizationName, "Evil Corp"),
            (CommonName, "team-b-bot, O=Example"),
        ],
    );
    let server = TestServer::start(&yaml, certs.dir.path()).await;
    let ch = tls_channel(server.tcp(), &certs.ca, Some((&genuine.0, &genuine.1)))
        .await
        .unwrap();
    assert_eq!(health_check(ch).await.unwrap(), ServingStatus::Serving);
    let ch = tls_channel(server.tcp(), &certs.ca, Some((&forged.0, &forged.1)))
        .await
        .unwrap();
    let err = health_check(ch).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    server.stop().await;
}

#[tokio::test]
async fn unauthenticated_instances_and_localhost_still_obey_acls() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "acl.yaml",
        "\"\":\n  allow:\n    - requests: [Check]\n",
    );
    let key = hs_key();
    let server = TestServer::start(
        &hs256_config(
            dir.path(),
            key.secret(),
            "  acl-config: acl.yaml\n  allow-unauthenticated-instances: [\"\"]\n",
        ),
        dir.path(),
    )
    .await;
    // No token needed, and an expired one is not used either.
    assert!(check(server.tcp(), None).await.is_ok());
    let expired = key.sign(&json!({"aud": AUD, "sub": "a", "exp": now() - 3600}));
    assert!(check(server.tcp(), Some(&expired)).await.is_ok());
    // The ACL still applies: Watch is not in the rule.
    let mut client = HealthClient::new(plain_channel(server.tcp()).await);
    let err = client
        .watch(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("anonymous"), "{err:?}");
    server.stop().await;

    // allow-localhost-requests: loopback peers need no token; the ACL applies.
    let server = TestServer::start(
        &hs256_config(
            dir.path(),
            key.secret(),
            "  acl-config: acl.yaml\n  allow-localhost-requests: true\n",
        ),
        dir.path(),
    )
    .await;
    assert!(check(server.tcp(), None).await.is_ok());
    let mut client = HealthClient::new(plain_channel(server.tcp()).await);
    assert_eq!(
        client
            .watch(HealthCheckRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    server.stop().await;
}

#[tokio::test]
async fn unrouted_rpcs_are_unimplemented_before_any_handler() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&loopback_config("", ""), dir.path()).await;
    let err = raw_unary(
        plain_channel(server.tcp()).await,
        "/build.bazel.remote.execution.v2.Secret/Backdoor",
        bytes::Bytes::new(),
        &[],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(err.message().contains("does not route"), "{err:?}");
    server.stop().await;
}

#[tokio::test]
async fn health_and_reflection_are_open_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let key = hs_key();
    std::fs::write(dir.path().join("hmac.secret"), key.secret()).unwrap();
    let yaml = loopback_config(
        "",
        "authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n",
    );
    let server = TestServer::start(&yaml, dir.path()).await;
    assert_eq!(
        check(server.tcp(), None).await.unwrap(),
        ServingStatus::Serving
    );
    server.stop().await;
}

#[test]
fn policy_check_and_explain_commands() {
    let dir = tempfile::tempdir().unwrap();
    let acl = write(dir.path(), "acl.yaml", ACL);
    let (code, stdout, stderr) = run_binary(&["policy", "check", &acl]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok:"), "{stdout}");
    // Patterns without a trailing $ mean something else under BuildGrid's prefix matching.
    assert!(stdout.contains("warning:"), "{stdout}");

    let bad = write(
        dir.path(),
        "bad.yaml",
        "team:\n  allow:\n    - actor: x\n      requets: [Write]\n",
    );
    let (code, _, stderr) = run_binary(&["policy", "check", &bad]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("bad.yaml:4") && stderr.contains("requets"),
        "{stderr}"
    );

    let secret = SECRET;
    let config = write(
        dir.path(),
        "gridgate.yaml",
        &hs256_config(dir.path(), secret, "  acl-config: acl.yaml\n"),
    );
    let (code, stdout, stderr) = run_binary(&[
        "policy",
        "explain",
        "--config",
        &config,
        "--claims",
        r#"{"sub":"repo:org/app:ref:main","act":"ci-bot"}"#,
        "--instance",
        "",
        "--rpc",
        "Check",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("ALLOW") && stdout.contains("allow[0]"),
        "{stdout}"
    );
    let (code, stdout, _) = run_binary(&[
        "policy",
        "explain",
        "--config",
        &config,
        "--claims",
        r#"{"sub":"bob"}"#,
        "--instance",
        "",
        "--rpc",
        "Write",
    ]);
    assert_eq!(code, 2, "{stdout}");
    assert!(stdout.contains("no rule allows Write"), "{stdout}");

    let key = TestKey::hmac(Algorithm::HS256, secret);
    let token = key.sign(&claims(ISS, AUD, "admin"));
    let (code, stdout, stderr) = run_binary(&[
        "policy",
        "explain",
        "--config",
        &config,
        "--token",
        &token,
        "--instance",
        "",
        "--rpc",
        "Write",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("actor=admin"), "{stdout}");
    let expired = key.sign(&json!({"aud": AUD, "sub": "a", "exp": now() - 3600}));
    let (code, _, stderr) = run_binary(&[
        "policy",
        "explain",
        "--config",
        &config,
        "--token",
        &expired,
        "--instance",
        "",
        "--rpc",
        "Write",
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("expired") && !stderr.contains(&expired),
        "{stderr}"
    );
}

#[test]
fn sighup_reloads_the_policy_of_the_running_binary() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "acl.yaml",
        "\"\":\n  allow:\n    - actor: alice\n",
    );
    let secret = SECRET;
    let config = write(
        dir.path(),
        "gridgate.yaml",
        &hs256_config(
            dir.path(),
            secret,
            "  acl-config: acl.yaml\n  watch-policy: false\n",
        ),
    );
    let mut bin = Binary::start(&["serve", "--config", &config]);
    let addr = bin.listening_addr();
    let key = TestKey::hmac(Algorithm::HS256, secret);
    let bob = key.sign(&claims(ISS, AUD, "bob"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(
        rt.block_on(check(addr, Some(&bob))).unwrap_err().code(),
        Code::PermissionDenied
    );
    write(
        dir.path(),
        "acl.yaml",
        "\"\":\n  allow:\n    - actor: bob\n",
    );
    // Not watched: nothing changes until SIGHUP.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(rt.block_on(check(addr, Some(&bob))).is_err());
    bin.signal("HUP");
    assert!(bin
        .wait_for_line("policy reloaded", Duration::from_secs(10))
        .is_some());
    assert!(rt.block_on(check(addr, Some(&bob))).is_ok());
    // An invalid file on SIGHUP: logged with file and line, old policy kept.
    write(dir.path(), "acl.yaml", "\"\":\n  allow:\n    - actor: [x\n");
    bin.signal("HUP");
    let line = bin
        .wait_for_line("policy reload failed", Duration::from_secs(10))
        .expect("failure logged");
    assert!(line.contains("acl.yaml"), "{line}");
    assert!(rt.block_on(check(addr, Some(&bob))).is_ok());
    bin.signal("TERM");
    assert_eq!(bin.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn github_and_gitlab_tokens_side_by_side_with_claim_rules() {
    const GH: &str = "https://token.actions.githubusercontent.com";
    const GL: &str = "https://gitlab.example";
    let gh_key = TestKey::rsa(Algorithm::RS256, "gh-1");
    let gl_key = TestKey::rsa(Algorithm::RS256, "gl-1");
    let gh = JwksServer::start(&[&gh_key]).await;
    let gl = JwksServer::start(&[&gl_key]).await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "acl.yaml",
        r#"
"":
  allow:
    # GitHub Actions: the repository's protected-branch builds.
    - claims: { repository: org/app, ref_protected: "true" }
      requests: [Check]
    # GitLab CI: one project's pipelines, by the mapped actor (user_login).
    - actor: builder
      claims: { project_path: group/app }
      requests: [Check]
  deny:
    - claims: { event_name: pull_request }
"#,
    );
    let yaml = loopback_config(
        "",
        &format!(
            "authorization:\n  method: jwt\n  open-health: false\n  acl-config: acl.yaml\n  claims:\n    actor: [user_login, actor, sub]\n  providers:\n    - issuer: {GH}\n      jwks-url: \"{}\"\n      algorithm: rs256\n      audience: https://gate.example\n    - issuer: {GL}\n      jwks-url: \"{}\"\n      algorithm: rs256\n      audience: gridgate\n",
            gh.url(),
            gl.url()
        ),
    );
    let server = TestServer::start(&yaml, dir.path()).await;
    let addr = server.tcp();
    let t = now();
    let github = |extra: serde_json::Value| {
        let mut c = json!({
            "iss": GH, "aud": "https://gate.example", "sub": "repo:org/app:ref:refs/heads/main",
            "repository": "org/app", "ref_protected": true, "actor": "octocat", "event_name": "push",
            "iat": t, "nbf": t - 300, "exp": t + 600,
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        gh_key.sign(&c)
    };
    assert!(check(addr, Some(&github(json!({})))).await.is_ok());
    // A boolean sent as a string matches the same rule.
    assert!(check(addr, Some(&github(json!({"ref_protected": "true"}))))
        .await
        .is_ok());
    assert_eq!(
        check(addr, Some(&github(json!({"ref_protected": false}))))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    // deny wins over allow.
    let err = check(addr, Some(&github(json!({"event_name": "pull_request"}))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("deny"), "{err:?}");
    // GitLab's token, mapped actor user_login.
    let gitlab = gl_key.sign(&json!({
        "iss": GL, "aud": "gridgate", "sub": "project_path:group/app:ref_type:branch:ref:main",
        "project_path": "group/app", "user_login": "builder", "iat": t, "exp": t + 600,
    }));
    assert!(check(addr, Some(&gitlab)).await.is_ok());
    // A GitLab-issued token signed with GitHub's key: refused (keys are per issuer).
    let forged = gh_key.sign(&json!({
        "iss": GL, "aud": "gridgate", "project_path": "group/app", "user_login": "builder",
        "iat": t, "exp": t + 600,
    }));
    assert_eq!(
        check(addr, Some(&forged)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // An issuer nobody configured.
    let other =
        gh_key.sign(&json!({"iss": "https://evil.example", "aud": "gridgate", "exp": t + 600}));
    assert_eq!(
        check(addr, Some(&other)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    server.stop().await;
}

#[test]
fn audit_lines_name_the_caller_and_never_the_token() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "acl.yaml",
        "\"\":\n  allow:\n    - actor: alice\n",
    );
    let secret = SECRET;
    let config = write(
        dir.path(),
        "gridgate.yaml",
        &hs256_config(dir.path(), secret, "  acl-config: acl.yaml\n"),
    );
    let mut bin = Binary::start(&["--log-format", "json", "serve", "--config", &config]);
    let addr = bin.listening_addr();
    let key = TestKey::hmac(Algorithm::HS256, secret);
    let alice = key.sign(&claims(ISS, AUD, "alice"));
    let bob = key.sign(&claims(ISS, AUD, "bob"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert!(rt.block_on(check(addr, Some(&alice))).is_ok());
    assert!(rt.block_on(check(addr, Some(&bob))).is_err());
    let allow = bin
        .wait_for_line("\"decision\":\"allow\"", Duration::from_secs(10))
        .expect("allow line");
    let deny = bin
        .wait_for_line("\"decision\":\"deny\"", Duration::from_secs(10))
        .expect("deny line");
    for (line, actor) in [(&allow, "alice"), (&deny, "bob")] {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
        assert_eq!(v["target"], "gridgate::audit", "{line}");
        assert_eq!(v["actor"], actor, "{line}");
        assert_eq!(v["rpc"], "Check", "{line}");
        assert!(
            v["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{line}"
        );
    }
    assert!(deny.contains("no rule allows Check"), "{deny}");
    bin.signal("TERM");
    assert_eq!(bin.wait_exit(Duration::from_secs(10)), Some(0));
    for line in &bin.seen {
        assert!(
            !line.contains(&alice) && !line.contains(&bob),
            "a token in the log: {line}"
        );
        assert!(
            !line.contains(&alice[alice.len() - 20..]),
            "a token signature in the log: {line}"
        );
    }
}

#[tokio::test]
async fn a_token_reused_on_one_connection_is_refused_once_its_key_is_gone() {
    let k1 = TestKey::rsa(Algorithm::RS256, "k1");
    let k2 = TestKey::rsa(Algorithm::RS256, "k2");
    let jwks = JwksServer::start(&[&k1, &k2]).await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        &jwks_config(&jwks.url(), "rs256", "  jwks-refetch-min-seconds: 1\n"),
        dir.path(),
    )
    .await;
    // One connection for everything.
    let mut client = HealthClient::new(plain_channel(server.tcp()).await);
    let t1 = k1.sign(&claims(ISS, AUD, "ci"));
    for _ in 0..3 {
        assert!(client
            .check(with_token(HealthCheckRequest::default(), &t1))
            .await
            .is_ok());
    }
    // The issuer withdraws k1; a token with an unknown kid makes the gate refetch.
    jwks.set_keys(&[&k2]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let k3 = TestKey::rsa(Algorithm::RS256, "k3");
    let probe = k3.sign(&claims(ISS, AUD, "ci"));
    assert!(client
        .check(with_token(HealthCheckRequest::default(), &probe))
        .await
        .is_err());
    // The same token on the same connection is no longer accepted.
    let err = client
        .check(with_token(HealthCheckRequest::default(), &t1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // A token of the remaining key still is.
    let t2 = k2.sign(&claims(ISS, AUD, "ci"));
    assert!(client
        .check(with_token(HealthCheckRequest::default(), &t2))
        .await
        .is_ok());
    server.stop().await;
}
