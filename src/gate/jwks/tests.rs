//! Unit tests of URL rules, key parsing and key selection.

use super::*;

#[test]
fn urls() {
    assert!(check_url("https://token.actions.githubusercontent.com/.well-known/jwks").is_ok());
    assert!(check_url("http://127.0.0.1:8080/jwks").is_ok());
    assert!(check_url("http://127.1.2.3/jwks").is_ok());
    assert!(check_url("http://[::1]:9/jwks").is_ok());
    assert!(check_url("http://localhost/jwks").is_ok());
    assert!(check_url("http://LOCALHOST/jwks").is_ok());
    assert!(check_url("http://example.com/jwks").is_err());
    assert!(check_url("http://10.0.0.1/jwks").is_err());
    assert!(check_url("http://localhost.evil.com/jwks").is_err());
    assert!(check_url("http://127.0.0.1.nip.io/jwks").is_err());
    assert!(check_url("ftp://127.0.0.1/jwks").is_err());
    assert!(check_url("file:///etc/jwks").is_err());
    assert!(check_url("not a url").is_err());
}

#[test]
fn algsets() {
    let set = AlgSet::from_slice(&[Algorithm::RS256, Algorithm::ES256]).unwrap();
    assert!(set.contains(Algorithm::RS256));
    assert!(!set.contains(Algorithm::PS256));
    assert!(AlgSet::RSA.contains(Algorithm::PS512));
    assert!(!AlgSet::RSA.contains(Algorithm::HS256));
    assert!(!AlgSet::RSA.contains(Algorithm::EdDSA));
    assert!(set.intersect(AlgSet::RSA) == AlgSet::one(Algorithm::RS256));
}

#[test]
fn rsa_key_sizes() {
    assert_eq!(modulus_bits(&[]), 0);
    assert_eq!(modulus_bits(&[0, 0]), 0);
    assert_eq!(modulus_bits(&[0, 1]), 1);
    assert_eq!(modulus_bits(&[0, 0x80, 0]), 16);
    assert_eq!(
        check_rsa_modulus(&[0xff; 128]),
        Err(RsaKeyError::TooSmall(1024))
    );
    // 256 bytes are not always 2048 bits.
    assert_eq!(
        check_rsa_modulus(&[0x7f; 256]),
        Err(RsaKeyError::TooSmall(2047))
    );
    assert_eq!(check_rsa_modulus(&[0x80; 256]), Ok(2048));
    let mut padded = vec![0; 3];
    padded.extend([0xc5; 512]);
    assert_eq!(check_rsa_modulus(&padded), Ok(4096));
    assert_eq!(check_rsa_modulus(&[0xff; 1024]), Ok(8192));
    assert_eq!(
        check_rsa_modulus(&[0x01; 1025]),
        Err(RsaKeyError::TooLarge(8193))
    );
    assert_eq!(
        RsaKeyError::TooSmall(1024).to_string(),
        "RSA key of 1024 bits; at least 2048 are needed"
    );
}

#[test]
fn key_set_documents() {
    let all = AlgSet::from_slice(&[Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]).unwrap();
    assert!(matches!(
        parse_jwks(b"not json", all, "test"),
        Err(FetchError::Json(_))
    ));
    assert!(matches!(
        parse_jwks(b"{}", all, "test"),
        Err(FetchError::Json(_))
    ));
    assert!(matches!(
        parse_jwks(b"{\"keys\":[]}", all, "test"),
        Err(FetchError::Empty)
    ));
    let oct = br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"},{"kty":"weird"},42]}"#;
    assert!(matches!(
        parse_jwks(oct, all, "test"),
        Err(FetchError::NoUsableKeys(3))
    ));
    // A P-256 point of the wrong length is refused when loaded.
    let bad_ec = br#"{"keys":[{"kty":"EC","crv":"P-256","x":"AAAA","y":"AAAA","kid":"e"}]}"#;
    assert!(matches!(
        parse_jwks(bad_ec, all, "test"),
        Err(FetchError::NoUsableKeys(1))
    ));
    // A short RSA modulus is refused.
    let small_rsa = br#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB","kid":"r"}]}"#;
    assert!(matches!(
        parse_jwks(small_rsa, all, "test"),
        Err(FetchError::NoUsableKeys(1))
    ));
}
