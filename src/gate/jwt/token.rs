//! The compact token: its three parts, the allowed bytes, the header.

use super::*;

/// The header and payload of a compact JWS (the signature is left to the library).
pub(super) struct Parts<'a> {
    pub(super) header: &'a str,
    pub(super) payload: &'a str,
}

/// The bytes of a compact JWS: the base64url alphabet and `.`.
pub(super) static TOKEN_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.';
        i += 1;
    }
    table
};

pub(super) fn split_token(token: &str) -> Result<Parts<'_>, AuthError> {
    if !token.bytes().all(|b| TOKEN_BYTES[usize::from(b)]) {
        return Err(AuthError::Malformed);
    }
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(payload), Some(signature), None)
            if !header.is_empty() && !payload.is_empty() && !signature.is_empty() =>
        {
            Ok(Parts { header, payload })
        }
        _ => Err(AuthError::Malformed),
    }
}

/// Decodes one base64url part as JSON.
pub(super) fn decode_part<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)
}

/// The header fields this module reads. A duplicated field is an error; `jku`,
/// `x5u`, `jwk` and `x5c` are deliberately not read.
#[derive(Deserialize)]
pub(super) struct RawHeader {
    pub(super) alg: String,
    #[serde(default)]
    pub(super) kid: Option<String>,
    #[serde(default)]
    pub(super) crit: Option<Value>,
}

/// The unverified issuer, to choose the provider.
#[derive(Deserialize)]
pub(super) struct IssuerOnly {
    #[serde(default)]
    pub(super) iss: Option<String>,
}
