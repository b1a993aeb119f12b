//! Providers: one issuer each, with its algorithms, keys and pre-built validations.

use super::*;

/// One configured provider, ready to verify.
pub(super) struct Provider {
    pub(super) name: String,
    pub(super) issuer: Option<String>,
    pub(super) audiences: Vec<String>,
    pub(super) algorithms: AlgSet,
    /// One Validation per allowed algorithm, built from the configuration.
    pub(super) validations: Vec<(Algorithm, Validation)>,
    pub(super) keys: ProviderKeys,
}

pub(super) enum ProviderKeys {
    Static(Arc<VerifyKey>),
    Jwks(Arc<JwksSource>),
}

/// Which key verified a cached token.
pub(super) enum KeyRef {
    Static,
    Jwks([u8; 32]),
}

pub(super) fn build_provider(
    p: ProviderSettings,
    leeway_secs: u64,
) -> Result<Provider, JwtConfigError> {
    let name = p.name;
    let mut algorithms: Vec<Algorithm> = Vec::new();
    for alg in p.algorithms {
        if !algorithms.contains(&alg) {
            algorithms.push(alg);
        }
    }
    if algorithms.is_empty() {
        return Err(JwtConfigError::NoAlgorithms { provider: name });
    }
    let Some(alg_set) = AlgSet::from_slice(&algorithms) else {
        let algorithm = algorithms
            .iter()
            .copied()
            .find(|a| AlgSet::from_slice(&[*a]).is_none())
            .unwrap_or_default();
        return Err(JwtConfigError::UnsupportedAlgorithm {
            provider: name,
            algorithm,
        });
    };
    let mismatch = |algorithm: Algorithm, key: &'static str| JwtConfigError::AlgorithmKeyMismatch {
        provider: name.clone(),
        algorithm,
        key,
    };

    let keys = match p.key {
        KeySource::Secret(secret) => {
            if let Some(alg) = algorithms
                .iter()
                .find(|a| a.family() != AlgorithmFamily::Hmac)
            {
                return Err(mismatch(
                    *alg,
                    "a shared secret (use a public key or a key set)",
                ));
            }
            if secret.is_empty() {
                return Err(JwtConfigError::EmptySecret { provider: name });
            }
            let (algorithm, minimum) = algorithms
                .iter()
                .map(|a| (*a, hmac_minimum(*a)))
                .max_by_key(|(_, m)| *m)
                .unwrap_or((Algorithm::HS256, 32));
            if secret.len() < minimum {
                if !p.allow_weak_secret {
                    return Err(JwtConfigError::WeakSecret {
                        provider: name,
                        algorithm,
                        length: secret.len(),
                        minimum,
                    });
                }
                tracing::warn!(
                    provider = %name,
                    length = secret.len(),
                    minimum,
                    "HMAC secret shorter than the hash output, accepted because allow-weak-secret is set"
                );
            }
            ProviderKeys::Static(Arc::new(VerifyKey {
                kid: None,
                algorithms: alg_set,
                key: DecodingKey::from_secret(&secret),
                fingerprint: [0; 32],
            }))
        }
        KeySource::PublicKeyPem(pem) => {
            let family = algorithms[0].family();
            if let Some(alg) = algorithms
                .iter()
                .find(|a| a.family() == AlgorithmFamily::Hmac || a.family() != family)
            {
                return Err(mismatch(
                    *alg,
                    "this public key (HMAC needs a shared secret; one PEM key serves one family)",
                ));
            }
            let key = public_key_from_pem(&pem, family, &algorithms).map_err(|reason| {
                JwtConfigError::BadPublicKey {
                    provider: name.clone(),
                    reason,
                }
            })?;
            jwks::check_rsa_key(&key).map_err(|source| match source {
                jwks::RsaKeyError::Malformed => JwtConfigError::BadPublicKey {
                    provider: name.clone(),
                    reason: "not a readable RSA public key",
                },
                source => JwtConfigError::RsaKeySize {
                    provider: name.clone(),
                    source,
                },
            })?;
            ProviderKeys::Static(Arc::new(VerifyKey {
                kid: None,
                algorithms: alg_set,
                key,
                fingerprint: [0; 32],
            }))
        }
        KeySource::Jwks(settings) => {
            if let Some(alg) = algorithms
                .iter()
                .find(|a| a.family() == AlgorithmFamily::Hmac)
            {
                return Err(mismatch(*alg, "a key set (HMAC needs a shared secret)"));
            }
            let source = JwksSource::new(&name, settings, alg_set).map_err(|source| {
                JwtConfigError::Jwks {
                    provider: name.clone(),
                    source,
                }
            })?;
            ProviderKeys::Jwks(Arc::new(source))
        }
    };

    if p.issuer.is_some() && p.audiences.is_empty() {
        tracing::warn!(
            provider = %name,
            "no audience configured: tokens of this issuer for any audience are accepted"
        );
    }
    let validations = algorithms
        .iter()
        .map(|alg| {
            (
                *alg,
                build_validation(*alg, p.issuer.as_deref(), &p.audiences, leeway_secs),
            )
        })
        .collect();
    Ok(Provider {
        name,
        issuer: p.issuer,
        audiences: p.audiences,
        algorithms: alg_set,
        validations,
        keys,
    })
}

/// The Validation for one (provider, algorithm): built from the configuration only.
pub(super) fn build_validation(
    alg: Algorithm,
    issuer: Option<&str>,
    audiences: &[String],
    leeway_secs: u64,
) -> Validation {
    let mut validation = Validation::new(alg);
    validation.algorithms = vec![alg];
    validation.leeway = leeway_secs;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let mut required: HashSet<String> = HashSet::from(["exp".to_owned()]);
    if let Some(issuer) = issuer {
        validation.set_issuer(&[issuer]);
        required.insert("iss".to_owned());
    }
    if audiences.is_empty() {
        validation.validate_aud = false;
        validation.aud = None;
    } else {
        validation.validate_aud = true;
        validation.set_audience(audiences);
        required.insert("aud".to_owned());
    }
    validation.required_spec_claims = required;
    validation
}

pub(super) fn hmac_minimum(alg: Algorithm) -> usize {
    match alg {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    }
}

/// Checks the size of the RSA key in a PEM, so that the config can refuse
/// it with the file and key path. A PEM that holds no RSA public key passes:
/// it is refused when the authenticator is built.
pub fn check_rsa_pem_size(pem: &[u8]) -> Result<(), jwks::RsaKeyError> {
    match DecodingKey::from_rsa_pem(pem) {
        Ok(key) => match jwks::check_rsa_key(&key) {
            Err(jwks::RsaKeyError::Malformed) => Ok(()),
            other => other,
        },
        Err(_) => Ok(()),
    }
}

pub(super) fn public_key_from_pem(
    pem: &[u8],
    family: AlgorithmFamily,
    algorithms: &[Algorithm],
) -> Result<DecodingKey, &'static str> {
    let text = std::str::from_utf8(pem).map_err(|_| "not PEM text")?;
    if text.contains("PRIVATE KEY-----") {
        return Err("a private key was given; configure the public key");
    }
    let key = match family {
        AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem),
        AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem),
        AlgorithmFamily::Ed => DecodingKey::from_ed_pem(pem),
        AlgorithmFamily::Hmac => return Err("HMAC needs a shared secret"),
    }
    .map_err(|_| "not a public key PEM of the algorithms' family")?;
    if family == AlgorithmFamily::Ec {
        let length = key.try_get_as_bytes().map(<[u8]>::len).unwrap_or(0);
        for alg in algorithms {
            let expected = if *alg == Algorithm::ES384 { 97 } else { 65 };
            if length != expected {
                return Err("the elliptic curve does not match the algorithm");
            }
        }
    }
    Ok(key)
}
