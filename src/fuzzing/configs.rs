//! `config`: config files and the Gate built from them.

use super::*;

/// A directory holding the files a fuzzed config may name by relative path.
pub(super) fn config_base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = scratch_dir().join("config");
        std::fs::create_dir_all(dir.join("policies")).expect("the config base can be made");
        let files: [(&str, &[u8]); 7] = [
            (
                "hmac.secret",
                b"0123456789abcdef0123456789abcdef0123456789abcdef\n",
            ),
            ("short.secret", b"short\n"),
            ("policy.yaml", b"team-a:\n  allow:\n    - actor: ci-.*\n"),
            (
                "policies/team-b.yaml",
                b"team-b:\n  allow: all\n  deny:\n    - requests: [Write]\n",
            ),
            (
                "server.crt",
                b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
            ),
            (
                "server.key",
                b"-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n",
            ),
            ("empty", b""),
        ];
        for (name, content) in files {
            std::fs::write(dir.join(name), content).expect("a config base file can be written");
        }
        dir
    })
}

/// Fuzzes config files: the input (as UTF-8, lossily) is parsed with relative
/// paths taken from a directory holding a secret, policies and TLS files. A config
/// that parses can be summarized, parses the same way again, and the Gate is built
/// from it (or refuses it) without panicking.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let base = config_base();
    let Ok(config) = Config::parse(&text, "fuzz.yaml", base) else {
        return;
    };
    let summary = config.summary();
    let again = Config::parse(&text, "fuzz.yaml", base).map(|c| c.summary());
    assert_eq!(again.ok().as_deref(), Some(summary.as_str()));
    let Ok(gate) = Gate::from_config(&config) else {
        return;
    };
    if let (Some(settings), Some(auth)) = (&config.authorization.jwt, gate.jwt()) {
        check_configured_tokens(settings, auth);
    }
}

/// Sends the configured authenticator a token signed with each configured HMAC
/// secret: valid unless its lifetime is over the configured cap, and the same
/// token already expired, refused unless the leeway is longer than its age.
/// Skipped when a provider fetches a key set (that would go to the network).
pub(super) fn check_configured_tokens(settings: &JwtConfig, auth: &JwtAuthenticator) {
    const IAT: u64 = 1_700_000_000;
    const EXP: u64 = 4_000_000_000;
    if settings
        .providers
        .iter()
        .any(|p| matches!(p.key, JwtKeyConfig::Jwks { .. }))
    {
        return;
    }
    let header = |alg: &str| URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}"}}"#));
    for provider in &settings.providers {
        let JwtKeyConfig::Secret(secret) = &provider.key else {
            continue;
        };
        for algorithm in &provider.algorithms {
            let alg = match algorithm {
                jsonwebtoken::Algorithm::HS256 => "HS256",
                jsonwebtoken::Algorithm::HS384 => "HS384",
                jsonwebtoken::Algorithm::HS512 => "HS512",
                _ => continue,
            };
            for exp in [EXP, IAT + 1] {
                let mut claims = Map::new();
                claims.insert("sub".into(), Value::from("alice"));
                claims.insert("iat".into(), Value::from(IAT));
                claims.insert("exp".into(), Value::from(exp));
                if let Some(issuer) = &provider.issuer {
                    claims.insert("iss".into(), Value::from(issuer.as_str()));
                }
                if let Some(audience) = provider.audiences.first() {
                    claims.insert("aud".into(), Value::from(audience.as_str()));
                }
                let text = format!(
                    "{}.{}",
                    header(alg),
                    URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string())
                );
                let token = format!("{text}.{}", sign(secret, alg, text.as_bytes()));
                let started = now_secs();
                let result = auth
                    .authenticate(&token)
                    .now_or_never()
                    .expect("verification with static keys completes without waiting");
                let leeway = settings.leeway.as_secs();
                let within_cap = settings
                    .max_token_lifetime
                    .is_none_or(|max| max.as_secs() >= exp - IAT);
                if exp == EXP {
                    assert_eq!(
                        result.is_ok(),
                        within_cap,
                        "a valid {alg} token of {:?}: {result:?}",
                        provider.name
                    );
                } else if leeway.saturating_add(exp) < started {
                    assert!(result.is_err(), "an expired {alg} token was accepted");
                }
            }
        }
    }
}
