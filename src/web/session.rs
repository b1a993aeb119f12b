//! Sealed cookies: the session (a signed-in viewer's ID token) and the
//! sign-in state (state, nonce and PKCE verifier of a sign-in in progress).
//!
//! A cookie's value is `base64url(nonce || AES-256-GCM(payload))` under a key
//! derived from `web.session-key-file`, with the cookie's name as associated
//! data, so one kind of cookie cannot be passed off as the other. Nothing is
//! kept on the server: any replica with the same key file opens any cookie.
//! The AEAD is aws-lc-rs's (the crypto library the rest of gridgate uses);
//! the `cookie` crate writes and parses the headers.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::digest;
use base64::Engine;
use cookie::{Cookie, SameSite};

/// The session cookie: a signed-in viewer.
pub const SESSION: &str = "gridgate_session";
/// The sign-in cookie: a sign-in in progress (ten minutes).
pub const SIGN_IN: &str = "gridgate_sign_in";
/// The longest cookie value opened (browsers keep 4 KiB per cookie).
const MAX_VALUE: usize = 4096;

/// Seals and opens cookie values with the session key.
pub struct Sealer {
    key: LessSafeKey,
    /// Whether cookies get `Secure` (TLS listener or an https public URL).
    pub secure: bool,
}

impl Sealer {
    /// A sealer with a key derived from the key file's bytes.
    pub fn new(secret: &[u8], secure: bool) -> Sealer {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"gridgate web cookies v1\0");
        ctx.update(secret);
        let derived = ctx.finish();
        // A 32-byte digest is always a valid AES-256 key.
        let key = UnboundKey::new(&AES_256_GCM, derived.as_ref())
            .map(LessSafeKey::new)
            .unwrap_or_else(|_| unreachable!("SHA-256 output is an AES-256 key"));
        Sealer { key, secure }
    }

    /// The sealed value of `payload` for the cookie `name`.
    pub fn seal(&self, name: &str, payload: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        if aws_lc_rs::rand::fill(&mut nonce).is_err() {
            // No randomness: a cookie that never opens (the viewer signs in again).
            return String::new();
        }
        let mut data = payload.to_vec();
        if self
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut data,
            )
            .is_err()
        {
            return String::new();
        }
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
    }

    /// The payload of a value sealed for `name`; None when it does not open.
    pub fn open(&self, name: &str, value: &str) -> Option<Vec<u8>> {
        if value.len() > MAX_VALUE {
            return None;
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .ok()?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut data = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut data)
            .ok()?;
        Some(plain.to_vec())
    }

    /// A `Set-Cookie` value: HttpOnly, SameSite=Lax, Secure when served so,
    /// for `path`, expiring at `expires` (Unix seconds).
    pub fn set_cookie(&self, name: &str, value: String, path: &str, expires: i64) -> String {
        let expires = time::OffsetDateTime::from_unix_timestamp(expires)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        Cookie::build((name.to_string(), value))
            .path(path.to_string())
            .http_only(true)
            .secure(self.secure)
            .same_site(SameSite::Lax)
            .expires(expires)
            .build()
            .to_string()
    }

    /// A `Set-Cookie` value that removes the cookie.
    pub fn clear_cookie(&self, name: &str, path: &str) -> String {
        Cookie::build((name.to_string(), String::new()))
            .path(path.to_string())
            .http_only(true)
            .secure(self.secure)
            .same_site(SameSite::Lax)
            .max_age(cookie::time::Duration::ZERO)
            .expires(time::OffsetDateTime::UNIX_EPOCH)
            .build()
            .to_string()
    }
}

/// The value of the cookie `name` in a request's `Cookie` headers.
pub fn cookie_value(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| Cookie::parse(pair.trim()).ok())
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
}

/// Random bytes as base64url (for state, nonce, PKCE verifier, CSRF token).
pub fn random_token(bytes: usize) -> Option<String> {
    let mut buf = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buf).ok()?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf))
}

/// Whether two secrets are equal, in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_under_its_name_and_key() {
        let s = Sealer::new(b"0123456789abcdef0123456789abcdef", true);
        let v = s.seal(SESSION, b"payload");
        assert_eq!(s.open(SESSION, &v).as_deref(), Some(&b"payload"[..]));
        assert_eq!(s.open(SIGN_IN, &v), None, "another cookie's name");
        let other = Sealer::new(b"another key, also 32 bytes long!!", true);
        assert_eq!(other.open(SESSION, &v), None, "another key");
        let mut tampered = v.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            s.open(SESSION, std::str::from_utf8(&tampered).unwrap()),
            None
        );
        assert_eq!(s.open(SESSION, "not base64!"), None);
        assert_eq!(s.open(SESSION, ""), None);
    }

    #[test]
    fn cookies_are_http_only_lax_and_secure_when_asked() {
        let s = Sealer::new(b"0123456789abcdef0123456789abcdef", true);
        let c = s.set_cookie(SESSION, "v".into(), "/", 2_000_000_000);
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Lax") && c.contains("Secure"),
            "{c}"
        );
        let s = Sealer::new(b"0123456789abcdef0123456789abcdef", false);
        assert!(!s.set_cookie(SESSION, "v".into(), "/", 0).contains("Secure"));
        let mut h = http::HeaderMap::new();
        h.insert("cookie", "a=1; gridgate_session=xyz; b=2".parse().unwrap());
        assert_eq!(cookie_value(&h, SESSION).as_deref(), Some("xyz"));
        assert_eq!(cookie_value(&h, SIGN_IN), None);
    }
}
