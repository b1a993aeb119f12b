//! The audit line: one per decision about a caller (target
//! `gridgate::audit`), never the token, every client-controlled value cut to
//! [`MAX_LOGGED_VALUE`] bytes so that one request never writes more than a
//! few KiB of log whatever it sends.

use std::borrow::Cow;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use prost::Message;

use super::identity::Identity;
use super::route::Route;
use crate::conn::ConnInfo;
use crate::proto::build::bazel::remote::execution::v2::RequestMetadata as RequestMetadataProto;

/// REAPI's binary request metadata header (Bazel sends it on every call).
pub const METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// The longest client-controlled value written on a log line, in bytes.
pub const MAX_LOGGED_VALUE: usize = 256;

/// `value` cut to [`MAX_LOGGED_VALUE`] bytes (on a character boundary), with
/// a note of how long it was.
pub fn bounded(value: &str) -> Cow<'_, str> {
    if value.len() <= MAX_LOGGED_VALUE {
        return Cow::Borrowed(value);
    }
    let mut end = MAX_LOGGED_VALUE;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…({} bytes)", &value[..end], value.len()))
}

/// Whether audit lines are written at all (they are at the default level).
pub fn enabled() -> bool {
    tracing::enabled!(target: "gridgate::audit", tracing::Level::INFO)
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

/// What the audit line says about a request, gathered as the Gate goes.
#[derive(Default)]
pub struct Audit {
    /// Whether lines are written (read once per request).
    pub on: bool,
    /// The request id.
    pub request_id: Option<HeaderValue>,
    /// The client's own words about itself.
    pub metadata: RequestMetadata,
    /// The connection.
    pub conn: Option<Arc<ConnInfo>>,
    /// The instance, once read.
    pub instance: Option<String>,
}

impl Audit {
    /// The audit context of a request, from its headers.
    pub fn new(headers: &HeaderMap, conn: Option<Arc<ConnInfo>>) -> Audit {
        let on = enabled();
        Audit {
            on,
            request_id: on
                .then(|| headers.get(crate::layers::request_id::HEADER).cloned())
                .flatten(),
            metadata: if on {
                RequestMetadata::from_headers(headers)
            } else {
                RequestMetadata::default()
            },
            conn,
            instance: None,
        }
    }

    /// Writes the line for a decision about `route`.
    pub fn log(
        &self,
        route: &Route,
        identity: Option<&Identity>,
        allowed: bool,
        reason: &str,
        rule: Option<&str>,
    ) {
        if !self.on {
            return;
        }
        let peer = self
            .conn
            .as_ref()
            .map(|c| c.peer.to_string())
            .unwrap_or_default();
        let (method, actor, subject, workflow, cert) = match identity {
            Some(i) => (
                i.method.as_str(),
                i.actor.as_deref().unwrap_or(""),
                i.subject.as_deref().unwrap_or(""),
                i.workflow.as_deref().unwrap_or(""),
                i.certificate
                    .as_deref()
                    .map(|c| c.subject.as_str())
                    .unwrap_or(""),
            ),
            None => ("none", "", "", "", ""),
        };
        let decision = if allowed { "allow" } else { "deny" };
        tracing::info!(
            target: "gridgate::audit",
            request_id = self.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
            tool = self.metadata.tool.as_str(),
            invocation = self.metadata.invocation.as_str(),
            peer = %peer,
            auth = method,
            actor = %bounded(actor),
            subject = %bounded(subject),
            workflow = %bounded(workflow),
            cert = %bounded(cert),
            instance = %bounded(self.instance.as_deref().unwrap_or("")),
            rpc = route.rpc,
            decision,
            reason = %bounded(reason),
            rule = rule.unwrap_or(""),
            "{decision} {}",
            route.rpc,
        );
    }

    /// Writes the line for a path without a route.
    pub fn unrouted(&self, path: &str) {
        if self.on {
            tracing::info!(
                target: "gridgate::audit",
                request_id = self.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
                path = %bounded(path),
                decision = "deny",
                "unrouted RPC"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_for_logs_on_a_character_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(1000);
        let cut = bounded(&long);
        assert!(cut.len() < MAX_LOGGED_VALUE + 32, "{}", cut.len());
        assert!(cut.ends_with("…(2000 bytes)"), "{cut}");
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
