//! Building the Gate from a config: the verifier's key rules, reported at the
//! config key they come from.

use std::path::Path;

use super::{Gate, GateError};
use crate::config::Config;

fn gate_in(dir: &Path, yaml: &str) -> Result<Gate, GateError> {
    let config = Config::parse(yaml, "test.yaml", dir).expect("the config parses");
    Gate::from_config(&config)
}

const JWT: &str =
    "server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\nauthorization:\n  method: jwt\n";

#[test]
fn a_key_set_url_the_verifier_refuses_is_named_by_its_key() {
    let d = tempfile::tempdir().unwrap();
    let yaml = format!("{JWT}  algorithm: rs256\n  jwks-url: [\"http://127.0.0.1:9/jwks\", \"http://keys.example/jwks\"]\n");
    let Err(GateError::Key { key, reason }) = gate_in(d.path(), &yaml) else {
        panic!("a plain-HTTP key set URL off loopback must be refused");
    };
    assert_eq!(key, "authorization.jwks-url[1]");
    assert!(
        reason.starts_with("\"http://keys.example/jwks\": "),
        "{reason}"
    );
    let yaml = format!(
        "{JWT}  algorithm: rs256\n  jwks-url: [\"http://127.0.0.1:9/jwks\", \"https://x/jwks\"]\n"
    );
    assert!(gate_in(d.path(), &yaml).is_ok());
}

#[test]
fn rsa_keys_aws_lc_cannot_verify_with_are_refused() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("rs1024.pem"),
        include_str!("../../tests/keys/rs1024.pub.pem"),
    )
    .unwrap();
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der = aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(
        aws_lc_rs::signature::KeyPair::public_key(&pair),
    )
    .unwrap();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    std::fs::write(
        d.path().join("rs2048.pem"),
        format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n"),
    )
    .unwrap();
    let yaml = |alg: &str, file: &str| format!("{JWT}  algorithm: {alg}\n  secret: {file}\n");
    for alg in ["rs256", "ps512"] {
        let Err(e) = gate_in(d.path(), &yaml(alg, "rs1024.pem")) else {
            panic!("a 1024-bit RSA key must be refused");
        };
        assert_eq!(
            e.to_string(),
            format!(
                "authorization.secret: {}: RSA key of 1024 bits; at least 2048 are needed",
                d.path().join("rs1024.pem").display()
            )
        );
        assert!(gate_in(d.path(), &yaml(alg, "rs2048.pem")).is_ok());
    }
}

#[test]
fn key_set_defaults_are_the_verifiers() {
    let d = tempfile::tempdir().unwrap();
    let yaml = format!("{JWT}  algorithm: rs256\n  jwks-url: https://x/jwks\n");
    let config = Config::parse(&yaml, "test.yaml", d.path()).unwrap();
    let settings = super::jwt_settings(config.authorization.jwt.as_ref().unwrap());
    let super::jwt::KeySource::Jwks(jwks) = &settings.providers[0].key else {
        panic!("a key set");
    };
    let defaults = super::jwks::JwksSettings::default();
    assert_eq!(jwks.refresh, defaults.refresh);
    assert_eq!(jwks.max_staleness, defaults.max_staleness);
    assert_eq!(jwks.min_refetch_interval, defaults.min_refetch_interval);
}
