//! `token`: JWT parsing and validation against authenticators with known keys.

use super::*;

/// The HMAC keys the fuzzed authenticators know: provider A, provider B and the
/// single (issuer-less) provider.
pub(super) const SECRET_A: &[u8] = b"gridgate fuzz secret of provider a, 40B!";
pub(super) const SECRET_B: &[u8] =
    b"gridgate fuzz secret of provider b: long enough for HS512 (64B)!!";
pub(super) const SECRET_SINGLE: &[u8] = b"gridgate fuzz single-provider key";
pub(super) const ISSUER_A: &str = "https://a.example";
pub(super) const ISSUER_B: &str = "https://b.example";
pub(super) const AUDIENCE_A: &str = "gridgate";
pub(super) const LEEWAY_SECS: u64 = 60;
/// A hundred years: long enough for a token with fixed times (seeds are replayed
/// for years) to pass, short enough for `exp` far in the future to be refused.
pub(super) const MAX_LIFETIME_SECS: u64 = 100 * 365 * 86_400;

/// The keys a structured input may be signed with: (secret, JWT `alg`).
pub(super) const SIGNERS: [(&[u8], &str); 6] = [
    (SECRET_A, "HS256"),
    (SECRET_B, "HS256"),
    (SECRET_B, "HS384"),
    (SECRET_B, "HS512"),
    (SECRET_SINGLE, "HS256"),
    (SECRET_A, "HS512"),
];

/// The HMAC of a JWT `alg` of [`SIGNERS`].
pub(super) fn hmac_algorithm(alg: &str) -> hmac::Algorithm {
    match alg {
        "HS384" => hmac::HMAC_SHA384,
        "HS512" => hmac::HMAC_SHA512,
        _ => hmac::HMAC_SHA256,
    }
}

pub(super) struct Authenticators {
    /// Two providers chosen by issuer: A (HS256, audience required) and B
    /// (HS256/384/512, no audience); a lifetime cap; no cache.
    pub(super) multi: Arc<JwtAuthenticator>,
    /// BuildGrid's single provider without issuer (HS256), with a small cache.
    pub(super) single: Arc<JwtAuthenticator>,
}

pub(super) fn secret_provider(
    name: &str,
    issuer: Option<&str>,
    algorithms: Vec<jsonwebtoken::Algorithm>,
    secret: &[u8],
    audiences: &[&str],
) -> ProviderSettings {
    ProviderSettings {
        name: name.into(),
        issuer: issuer.map(str::to_owned),
        algorithms,
        key: KeySource::Secret(secret.to_vec()),
        audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
        allow_weak_secret: false,
    }
}

pub(super) fn authenticators() -> &'static Authenticators {
    use jsonwebtoken::Algorithm::{HS256, HS384, HS512};
    static AUTH: OnceLock<Authenticators> = OnceLock::new();
    AUTH.get_or_init(|| {
        let multi = JwtSettings {
            providers: vec![
                secret_provider("a", Some(ISSUER_A), vec![HS256], SECRET_A, &[AUDIENCE_A]),
                secret_provider(
                    "b",
                    Some(ISSUER_B),
                    vec![HS256, HS384, HS512],
                    SECRET_B,
                    &[],
                ),
            ],
            leeway: Duration::from_secs(LEEWAY_SECS),
            max_lifetime: Some(Duration::from_secs(MAX_LIFETIME_SECS)),
            cache_capacity: 0,
            claims: ClaimMapping::default(),
        };
        let single = JwtSettings {
            providers: vec![secret_provider(
                "single",
                None,
                vec![HS256],
                SECRET_SINGLE,
                &[],
            )],
            leeway: Duration::from_secs(LEEWAY_SECS),
            max_lifetime: None,
            cache_capacity: 64,
            claims: ClaimMapping::default(),
        };
        Authenticators {
            multi: JwtAuthenticator::new(multi).expect("the fuzzing JWT settings are valid"),
            single: JwtAuthenticator::new(single).expect("the fuzzing JWT settings are valid"),
        }
    })
}

pub(super) fn sign(key: &[u8], alg: &str, message: &[u8]) -> String {
    let tag = hmac::sign(&hmac::Key::new(hmac_algorithm(alg), key), message);
    URL_SAFE_NO_PAD.encode(tag.as_ref())
}

/// The signers (indices into [`SIGNERS`]) whose MAC the token's third part is.
pub(super) fn valid_signers(token: &str) -> Vec<usize> {
    let Some((signed, signature)) = token.rsplit_once('.') else {
        return Vec::new();
    };
    let Ok(signature) = URL_SAFE_NO_PAD.decode(signature) else {
        return Vec::new();
    };
    SIGNERS
        .iter()
        .enumerate()
        .filter(|(_, (key, alg))| {
            let key = hmac::Key::new(hmac_algorithm(alg), key);
            hmac::verify(&key, signed.as_bytes(), &signature).is_ok()
        })
        .map(|(i, _)| i)
        .collect()
}

pub(super) fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A claim as seconds, the way a reader of the spec would take it.
pub(super) fn seconds(claims: &Map<String, Value>, name: &str) -> Option<f64> {
    claims.get(name).and_then(Value::as_f64)
}

/// What must hold when `auth` accepted `token`, given the claims it carries.
pub(super) fn check_accepted(token: &str, multi: bool, identity: &Identity, started: u64) {
    let signers = valid_signers(token);
    let mut parts = token.split('.');
    let header = parts.next().unwrap_or_default();
    let payload = parts.next().unwrap_or_default();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap_or_default())
        .expect("an accepted token has a JSON header");
    let claims: Map<String, Value> =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap_or_default())
            .expect("an accepted token has a JSON object as claims");
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert_eq!(identity.method, AuthMethod::Jwt);
    assert_eq!(*identity.claims, claims, "the identity carries the claims");

    let exp = seconds(&claims, "exp").expect("an accepted token has a numeric exp");
    let now = now_secs();
    assert!(
        exp + LEEWAY_SECS as f64 + 1.0 >= started as f64,
        "accepted an expired token (exp {exp}, now {started})"
    );
    for claim in ["iat", "nbf"] {
        if let Some(t) = seconds(&claims, claim) {
            assert!(
                t <= (now + LEEWAY_SECS) as f64 + 1.0,
                "accepted a token whose {claim} ({t}) is in the future"
            );
        }
    }
    let signed_by = |secret: &[u8], algs: &[&str]| {
        signers.iter().any(|&i| {
            let (key, name) = SIGNERS[i];
            key == secret && name == alg && algs.contains(&name)
        })
    };
    if !multi {
        assert!(
            signed_by(SECRET_SINGLE, &["HS256"]),
            "single provider accepted a token not signed with its key as HS256"
        );
        return;
    }
    match claims.get("iss").and_then(Value::as_str) {
        Some(ISSUER_A) => {
            assert!(
                signed_by(SECRET_A, &["HS256"]),
                "provider a accepted a token not signed with its key as HS256"
            );
            let audience_ok = match claims.get("aud") {
                Some(Value::String(a)) => a == AUDIENCE_A,
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(AUDIENCE_A)),
                _ => false,
            };
            assert!(
                audience_ok,
                "provider a accepted a token for another audience"
            );
        }
        Some(ISSUER_B) => {
            assert!(
                signed_by(SECRET_B, &["HS256", "HS384", "HS512"]),
                "provider b accepted a token not signed with its key"
            );
        }
        other => panic!("accepted a token of issuer {other:?}"),
    }
    let start = seconds(&claims, "iat")
        .or_else(|| seconds(&claims, "nbf"))
        .unwrap_or(started as f64);
    assert!(
        exp - start <= MAX_LIFETIME_SECS as f64 + 1.0,
        "accepted a token living longer than the cap (exp {exp}, start {start})"
    );
}

/// Runs one token through both authenticators and checks what they accept.
pub(super) fn authenticate_all(token: &str, must_be_signed: bool) {
    let auth = authenticators();
    for (multi, authenticator) in [(true, &auth.multi), (false, &auth.single)] {
        let started = now_secs();
        // Static keys: verification never waits, so the future is ready at once.
        let result = authenticator
            .authenticate(token)
            .now_or_never()
            .expect("verification with static keys completes without waiting");
        if let Ok(identity) = result {
            if must_be_signed {
                assert!(
                    !valid_signers(token).is_empty(),
                    "accepted a token that no known key signed"
                );
            }
            check_accepted(token, multi, &identity, started);
        }
    }
}

/// Fuzzes JWT parsing and validation.
///
/// The first byte chooses how the rest becomes a token:
/// - `0` (mod 4): the rest is the token text, as a client sends it; it must never
///   be accepted unless one of the known keys made its signature;
/// - `1`: the rest is the claims JSON, with a fixed header, signed with one of the
///   known keys (chosen by the first byte) so claim validation is reached;
/// - `2`: the rest is `header JSON \0 claims JSON`, both signed;
/// - `3`: the rest is `header.payload` as written (base64url or not), signed.
///
/// Whatever is accepted must satisfy what the configuration asks for (expiry,
/// issuer and matching key, audience, lifetime cap, `iat`/`nbf` not in the future).
pub fn token(data: &[u8]) {
    if let Some((token, raw)) = token_of(data) {
        authenticate_all(&token, raw);
    }
}

/// The token an input of [`token`] stands for, and whether it is raw client text.
pub(super) fn token_of(data: &[u8]) -> Option<(String, bool)> {
    let (&first, rest) = data.split_first()?;
    let (key, alg) = SIGNERS[usize::from(first >> 2) % SIGNERS.len()];
    let signed = |header: &[u8], claims: &[u8]| {
        let text = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature = sign(key, alg, text.as_bytes());
        format!("{text}.{signature}")
    };
    Some(match first & 3 {
        0 => (String::from_utf8_lossy(rest).into_owned(), true),
        1 => {
            let header = match first >> 5 {
                0 => format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#),
                1 => format!(r#"{{"alg":"{alg}","kid":"k1"}}"#),
                2 => format!(r#"{{"alg":"{alg}","crit":["exp"]}}"#),
                _ => format!(r#"{{"alg":"{alg}"}}"#),
            };
            (signed(header.as_bytes(), rest), false)
        }
        2 => {
            let (header, claims) = match rest.iter().position(|&b| b == 0) {
                Some(at) => (&rest[..at], &rest[at + 1..]),
                None => (rest, &b"{}"[..]),
            };
            (signed(header, claims), false)
        }
        _ => {
            let text = String::from_utf8_lossy(rest);
            let signature = sign(key, alg, text.as_bytes());
            (format!("{text}.{signature}"), false)
        }
    })
}
