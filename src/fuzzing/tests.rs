//! The fuzz checks reach what they are meant to check.

use super::*;

fn accepted(auth: &JwtAuthenticator, data: &[u8]) -> bool {
    let (token, _) = token_of(data).unwrap();
    auth.authenticate(&token).now_or_never().unwrap().is_ok()
}

/// The structured modes reach acceptance, so the invariants on accepted
/// tokens are exercised, and the checks refuse what they should.
#[test]
fn signed_inputs_are_accepted_and_checked() {
    let auth = authenticators();
    let a = br#"{"iss":"https://a.example","aud":"gridgate","iat":1700000000,"exp":4000000000}"#;
    // Mode 1, signer 0: provider a's key, HS256.
    assert!(accepted(&auth.multi, &[&[1u8][..], a].concat()));
    // Signer 1: provider b's key, under provider a's issuer.
    assert!(!accepted(&auth.multi, &[&[1u8 | 1 << 2][..], a].concat()));
    // Signer 4: the single provider's key.
    let single = br#"{"sub":"alice","exp":4000000000}"#;
    assert!(accepted(
        &auth.single,
        &[&[1u8 | 4 << 2][..], single].concat()
    ));
    // Far beyond the lifetime cap.
    let b = br#"{"iss":"https://b.example","iat":1700000000,"exp":99999999999}"#;
    assert!(!accepted(&auth.multi, &[&[1u8 | 3 << 2][..], b].concat()));
    token(&[&[1u8][..], a].concat());
}
