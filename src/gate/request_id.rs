//! Request ids and REAPI request metadata, for log lines.
//!
//! Every request gets an id: the client's `x-request-id` when it sends a
//! usable one (1 to 128 visible ASCII characters), a fresh 32-hex-digit id
//! otherwise. The id is set on the request (so an upstream sees it), returned
//! in the response headers and written on the request's audit line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::{HeaderMap, HeaderValue};
use prost::Message;

use crate::proto::build::bazel::remote::execution::v2::RequestMetadata as RequestMetadataProto;

/// The request id header.
pub const HEADER: &str = "x-request-id";

/// REAPI's binary request metadata header (Bazel sends it on every call).
pub const METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// The longest client-chosen id kept.
pub const MAX_LEN: usize = 128;

/// Takes the client's id or makes one, and sets it on the request.
pub fn assign(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(HEADER) {
        let ok = !v.is_empty()
            && v.len() <= MAX_LEN
            && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
        if ok && headers.get_all(HEADER).iter().count() == 1 {
            return v.clone();
        }
    }
    let id = generate();
    headers.insert(HEADER, id.clone());
    id
}

/// A fresh id: a random per-process prefix and a counter, as 32 hex digits.
fn generate() -> HeaderValue {
    static BASE: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        h.finish()
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Hex digits written in place: no formatting machinery on every request.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 32];
    for (i, byte) in base
        .to_be_bytes()
        .into_iter()
        .chain(n.to_be_bytes())
        .enumerate()
    {
        text[2 * i] = HEX[usize::from(byte >> 4)];
        text[2 * i + 1] = HEX[usize::from(byte & 0xf)];
    }
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// What a REAPI client says about itself, for the request's log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestMetadata {
    /// `tool_details.tool_name` and `tool_version`, as `bazel/7.1.0`.
    pub tool: String,
    /// `tool_invocation_id`.
    pub invocation: String,
}

impl RequestMetadata {
    /// Reads `requestmetadata-bin` if present and well formed (empty otherwise).
    /// Values are cut to 128 characters.
    pub fn from_headers(headers: &HeaderMap) -> RequestMetadata {
        use base64::Engine;
        let Some(value) = headers.get(METADATA_HEADER) else {
            return RequestMetadata::default();
        };
        if value.len() > 8192 {
            return RequestMetadata::default();
        }
        let text = value.as_bytes();
        let end = text.iter().rposition(|b| *b != b'=').map_or(0, |i| i + 1);
        let Ok(bytes) = base64::engine::general_purpose::STANDARD_NO_PAD.decode(&text[..end])
        else {
            return RequestMetadata::default();
        };
        let Ok(m) = RequestMetadataProto::decode(bytes.as_slice()) else {
            return RequestMetadata::default();
        };
        let cut = |s: &str| s.chars().take(128).collect::<String>();
        let tool = match m.tool_details {
            Some(t) if t.tool_version.is_empty() => cut(&t.tool_name),
            Some(t) => cut(&format!("{}/{}", t.tool_name, t.tool_version)),
            None => String::new(),
        };
        RequestMetadata {
            tool,
            invocation: cut(&m.tool_invocation_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_kept_when_usable() {
        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(assign(&mut h), "abc-123");

        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_str(&"x".repeat(200)).unwrap());
        let id = assign(&mut h);
        assert_eq!(id.len(), 32);
        assert_eq!(h.get(HEADER), Some(&id));

        let mut h = HeaderMap::new();
        let a = assign(&mut h);
        let mut h = HeaderMap::new();
        let b = assign(&mut h);
        assert_ne!(a, b);
        let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
        assert!(
            a.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
            "{a}"
        );
        // One per-process prefix, then a counter.
        assert_eq!(a[..16], b[..16]);
        let (na, nb) = (
            u64::from_str_radix(&a[16..], 16).unwrap(),
            u64::from_str_radix(&b[16..], 16).unwrap(),
        );
        assert!(nb > na, "{a} then {b}");
    }

    #[test]
    fn request_metadata_is_read() {
        use crate::proto::build::bazel::remote::execution::v2::ToolDetails;
        use base64::Engine;
        let m = RequestMetadataProto {
            tool_details: Some(ToolDetails {
                tool_name: "bazel".into(),
                tool_version: "2.1.0".into(),
            }),
            tool_invocation_id: "inv-1".into(),
            ..Default::default()
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode(m.encode_to_vec());
        let mut h = HeaderMap::new();
        h.insert(METADATA_HEADER, HeaderValue::from_str(&b64).unwrap());
        let got = RequestMetadata::from_headers(&h);
        assert_eq!(got.tool, "bazel/2.1.0");
        assert_eq!(got.invocation, "inv-1");

        h.insert(METADATA_HEADER, HeaderValue::from_static("!!!"));
        assert_eq!(
            RequestMetadata::from_headers(&h),
            RequestMetadata::default()
        );
    }
}
