//! Micro-benchmarks of the Gate's per-request work (criterion):
//! token verification uncached (HS256, RS256) and cached, and a policy decision.
//!
//! Run: `cargo bench --bench gate`. Figures are recorded in bench/RESULTS.md.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

#[path = "../tests/common/jwks_server.rs"]
mod jwks_server;

use criterion::{criterion_group, criterion_main, Criterion};
use gridgate::gate::identity::Identity;
use gridgate::gate::jwt::{
    ClaimMapping, JwtAuthenticator, JwtSettings, KeySource, ProviderSettings,
};
use gridgate::gate::policy::{Policy, PolicyOptions};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use jwks_server::TestKey;
use serde_json::json;

fn claims() -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "iss": "https://ci.example", "aud": "gridgate", "sub": "repo:org/app:ref:refs/heads/main",
        "actor": "ci-bot", "repository": "org/app", "ref_protected": "true",
        "iat": now, "nbf": now, "exp": now + 3600,
    })
}

fn authenticator(alg: Algorithm, key: KeySource, cache: u64) -> Arc<JwtAuthenticator> {
    JwtAuthenticator::new(JwtSettings {
        providers: vec![ProviderSettings {
            name: "bench".into(),
            issuer: None,
            algorithms: vec![alg],
            key,
            audiences: vec!["gridgate".into()],
            allow_weak_secret: false,
        }],
        cache_capacity: cache,
        claims: ClaimMapping::default(),
        ..JwtSettings::default()
    })
    .expect("authenticator")
}

fn bench_tokens(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let secret = b"bench-secret-bench-secret-bench-secret!".to_vec();
    let hs_token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(&secret),
    )
    .expect("sign");
    let hs_uncached = authenticator(Algorithm::HS256, KeySource::Secret(secret.clone()), 0);
    let hs_cached = authenticator(Algorithm::HS256, KeySource::Secret(secret), 1000);

    let rsa = TestKey::rsa(Algorithm::RS256, "bench");
    let rs_token = rsa.sign(&claims());
    let rs_uncached = authenticator(
        Algorithm::RS256,
        KeySource::PublicKeyPem(rsa.public_pem().as_bytes().to_vec()),
        0,
    );

    let mut g = c.benchmark_group("token");
    g.bench_function("hs256_uncached", |b| {
        b.iter(|| {
            rt.block_on(hs_uncached.authenticate(&hs_token))
                .expect("valid")
        })
    });
    g.bench_function("rs256_uncached", |b| {
        b.iter(|| {
            rt.block_on(rs_uncached.authenticate(&rs_token))
                .expect("valid")
        })
    });
    g.bench_function("hs256_cached", |b| {
        b.iter(|| {
            rt.block_on(hs_cached.authenticate(&hs_token))
                .expect("valid")
        })
    });
    g.finish();
}

fn bench_policy(c: &mut Criterion) {
    let yaml = r#"
team-a:
  allow:
    - actor: ci-bot
      subject: 'repo:org/app:ref:refs/heads/.*'
      requests: [FindMissingBlobs, BatchUpdateBlobs, Write, GetActionResult, UpdateActionResult]
    - claims: { repository: org/app, ref_protected: 'true' }
      requests: [Read, GetCapabilities]
  deny:
    - claims: { event_name: pull_request }
      requests: [UpdateActionResult]
"team-*":
  allow:
    - subject: admin
"#;
    let policy = Policy::from_yaml(yaml, "bench.yaml", &PolicyOptions::default()).expect("policy");
    let mut identity = Identity::anonymous(None);
    identity.actor = Some("ci-bot".into());
    identity.subject = Some("repo:org/app:ref:refs/heads/main".into());
    c.bench_function("policy/decide_allow", |b| {
        b.iter(|| {
            let d = policy.decide("team-a", "FindMissingBlobs", &identity);
            assert!(d.allowed);
        })
    });
}

/// The whole admission of one FindMissingBlobs request (route, peek, identify,
/// decide, record) in front of a service that answers at once: the Gate's
/// per-request cost, with authorization none and with a cached JWT plus ACL.
fn bench_admit(c: &mut Criterion) {
    use gridgate::config::Config;
    use gridgate::gate::{Gate, GateLayer};
    use gridgate::proto::build::bazel::remote::execution::v2 as re;
    use prost::Message;
    use tower::{Layer, ServiceExt};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = b"bench-secret-bench-secret-bench-secret!";
    std::fs::write(dir.path().join("hmac.secret"), secret).expect("secret");
    std::fs::write(
        dir.path().join("acl.yaml"),
        "main:\n  allow:\n    - actor: bench-client\n      subject: bench-user\n      requests: [FindMissingBlobs, GetCapabilities]\n",
    )
    .expect("acl");
    let base = "server:\n  - address: \"127.0.0.1:0\"\n    insecure-mode: true\n";
    let none = format!("{base}authorization:\n  method: none\n");
    let jwt = format!("{base}authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  audience: gridgate\n  acl-config: acl.yaml\n");
    let mut token_claims = claims();
    token_claims["sub"] = json!("bench-user");
    token_claims["act"] = json!("bench-client");
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &token_claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("sign");

    let msg = re::FindMissingBlobsRequest {
        instance_name: "main".into(),
        blob_digests: (0..10)
            .map(|i| re::Digest {
                hash: format!("{i:064x}"),
                size_bytes: 1000 + i,
            })
            .collect(),
        digest_function: 0,
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend((msg.len() as u32).to_be_bytes());
    framed.extend(msg);
    let framed = bytes::Bytes::from(framed);

    let mut g = c.benchmark_group("admit");
    for (name, yaml, with_token) in [("none", &none, false), ("jwt_acl_cached", &jwt, true)] {
        let config = Config::parse(yaml, "bench.yaml", dir.path()).expect("config");
        let gate = Arc::new(Gate::from_config(&config).expect("gate"));
        let inner = tower::service_fn(|req: http::Request<tonic::body::Body>| async move {
            assert!(req
                .extensions()
                .get::<gridgate::gate::Admission>()
                .is_some());
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let svc = GateLayer::new(gate).layer(inner);
        let request = || {
            let mut b = http::Request::builder()
                .method("POST")
                .uri("/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs")
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            if with_token {
                b = b.header("authorization", format!("Bearer {token}"));
            }
            b.body(tonic::body::Body::new(http_body_util::Full::new(
                framed.clone(),
            )))
            .expect("request")
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                let resp = rt
                    .block_on(svc.clone().oneshot(request()))
                    .expect("infallible");
                assert_eq!(resp.status(), 200);
                assert!(resp.headers().get("grpc-status").is_none(), "refused");
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_tokens, bench_policy, bench_admit);
criterion_main!(benches);
