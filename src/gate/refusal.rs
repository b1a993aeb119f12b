//! Why the Gate refused a request, as one type: each [`Refusal`] knows its
//! gRPC status, its metric labels and the text of its audit line, and
//! [`Refusal::into_response`] is the one place they become a response.
//!
//! Messages are safe to send to the caller: they name the limit or the rule
//! at fault, never a token, an upstream's address or anything internal.

use std::fmt;

use http::Response;
use tonic::body::Body;
use tonic::{Code, Status};

use super::authn::Unauthenticated;
use super::frame;
use super::policy::SharedStr;

/// A request the Gate did not admit.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// The path has no route entry.
    Unrouted {
        /// The path, already cut to a loggable length.
        path: String,
    },
    /// Open routes and anonymous callers hold their whole share of requests
    /// in progress (in total, or on this connection).
    AnonymousShare {
        /// Which share: `in total` or `on this connection`.
        scope: &'static str,
        /// Its size.
        max: usize,
    },
    /// Bytes buffered before a decision would exceed a budget.
    PendingBytes {
        /// The config key of the budget.
        key: &'static str,
        /// Its size (for anonymous callers, their share of it).
        max: usize,
        /// Whether the caller is anonymous (and had the smaller share).
        anonymous: bool,
    },
    /// The request's headers are over `limits.max-header-list-bytes`.
    HeaderList {
        /// Their size as HTTP/2 counts it.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A `grpc-encoding` the Gate cannot read.
    UnsupportedEncoding(Status),
    /// The first message was not whole within `limits.first-message-timeout-seconds`.
    FirstMessageTimeout {
        /// The timeout.
        seconds: u64,
    },
    /// A message over `limits.max-message-bytes` (on the wire or decompressed).
    TooLarge(Status),
    /// A request the Gate cannot read as the service would (bad framing,
    /// a compressed message with bytes after its end, a second message on a
    /// unary call, request trailers, a malformed protobuf).
    Malformed(Status),
    /// An instance name longer than `limits.max-instance-name-bytes`.
    InstanceNameTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Missing, malformed, expired or unverifiable credentials.
    Unauthenticated(Unauthenticated),
    /// The caller is known (or anonymous where allowed) but no rule allows it.
    Denied {
        /// The policy's reason.
        reason: SharedStr,
        /// Whether the caller is anonymous.
        anonymous: bool,
    },
}

impl Refusal {
    /// The refusal for an error of reading a request's messages.
    pub fn from_frame_status(status: Status) -> Refusal {
        match status.code() {
            Code::ResourceExhausted => Refusal::TooLarge(status),
            _ => Refusal::Malformed(status),
        }
    }

    /// The gRPC status code.
    pub fn code(&self) -> Code {
        match self {
            Refusal::Unrouted { .. } => Code::Unimplemented,
            Refusal::AnonymousShare { .. }
            | Refusal::PendingBytes { .. }
            | Refusal::HeaderList { .. } => Code::ResourceExhausted,
            Refusal::UnsupportedEncoding(s) | Refusal::TooLarge(s) | Refusal::Malformed(s) => {
                s.code()
            }
            Refusal::FirstMessageTimeout { .. } => Code::DeadlineExceeded,
            Refusal::InstanceNameTooLong { .. } => Code::InvalidArgument,
            Refusal::Unauthenticated(_) => Code::Unauthenticated,
            Refusal::Denied { .. } => Code::PermissionDenied,
        }
    }

    /// The (outcome, reason) labels of `gridgate_gate_decisions_total`.
    pub fn labels(&self) -> (&'static str, &'static str) {
        match self {
            Refusal::Unrouted { .. } => ("unrouted", "no_route"),
            Refusal::AnonymousShare { .. } => ("shed", "anonymous_share"),
            Refusal::PendingBytes { .. } => ("shed", "pending_bytes"),
            Refusal::HeaderList { .. } => ("invalid", "header_list_too_large"),
            Refusal::UnsupportedEncoding(_) => ("invalid", "unsupported_encoding"),
            Refusal::FirstMessageTimeout { .. } => ("invalid", "first_message_timeout"),
            Refusal::TooLarge(_) => ("invalid", "message_too_large"),
            Refusal::Malformed(_) => ("invalid", "malformed_request"),
            Refusal::InstanceNameTooLong { .. } => ("invalid", "instance_name_too_long"),
            Refusal::Unauthenticated(why) => ("unauthenticated", why.metric_label()),
            Refusal::Denied {
                anonymous: true, ..
            } => ("deny", "anonymous_no_rule"),
            Refusal::Denied { .. } => ("deny", "no_rule"),
        }
    }

    /// Whether the refusal is a decision about the caller (and so gets an
    /// audit line), rather than about the server's load or the request's form.
    pub fn is_decision(&self) -> bool {
        matches!(
            self,
            Refusal::Unrouted { .. } | Refusal::Unauthenticated(_) | Refusal::Denied { .. }
        )
    }

    /// The status sent to the caller.
    pub fn status(&self) -> Status {
        let code = self.code();
        match self {
            Refusal::UnsupportedEncoding(s) | Refusal::TooLarge(s) | Refusal::Malformed(s) => {
                Status::new(code, s.message())
            }
            other => Status::new(code, other.to_string()),
        }
    }

    /// The Trailers-Only response.
    pub fn into_response(self) -> Response<Body> {
        let unsupported = matches!(self, Refusal::UnsupportedEncoding(_));
        let mut resp = self.status().into_http::<Body>();
        if unsupported {
            resp.headers_mut().insert(
                "grpc-accept-encoding",
                http::HeaderValue::from_static(frame::ACCEPT_ENCODING),
            );
        }
        resp
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unrouted { path } => write!(f, "gridgate does not route {path}"),
            Refusal::AnonymousShare { scope, max } => write!(
                f,
                "open routes and anonymous callers hold their share of {max} requests in progress \
                 {scope} (limits.anonymous-share-percent); retry with backoff or authenticate"
            ),
            Refusal::PendingBytes {
                key,
                max,
                anonymous,
            } => {
                let whose = if *anonymous {
                    "the anonymous share of "
                } else {
                    ""
                };
                write!(
                    f,
                    "requests waiting for a decision hold {whose}limits.{key} ({max} bytes); retry with backoff"
                )
            }
            Refusal::HeaderList { size, max } => write!(
                f,
                "request headers of {size} bytes are over limits.max-header-list-bytes ({max})"
            ),
            Refusal::UnsupportedEncoding(s) | Refusal::TooLarge(s) | Refusal::Malformed(s) => {
                f.write_str(s.message())
            }
            Refusal::FirstMessageTimeout { seconds } => write!(
                f,
                "the first request message was not complete within {seconds}s \
                 (limits.first-message-timeout-seconds)"
            ),
            Refusal::InstanceNameTooLong { len, max } => write!(
                f,
                "instance name of {len} bytes is longer than limits.max-instance-name-bytes ({max})"
            ),
            Refusal::Unauthenticated(why) => write!(f, "{why}"),
            Refusal::Denied { reason, anonymous } => {
                if *anonymous {
                    f.write_str("anonymous caller: ")?;
                }
                f.write_str(reason)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_code_and_labels() {
        let cases = [
            (
                Refusal::Unrouted {
                    path: "/x/y".into(),
                },
                Code::Unimplemented,
                ("unrouted", "no_route"),
            ),
            (
                Refusal::AnonymousShare {
                    scope: "in total",
                    max: 2,
                },
                Code::ResourceExhausted,
                ("shed", "anonymous_share"),
            ),
            (
                Refusal::PendingBytes {
                    key: "max-pending-bytes",
                    max: 10,
                    anonymous: true,
                },
                Code::ResourceExhausted,
                ("shed", "pending_bytes"),
            ),
            (
                Refusal::HeaderList { size: 20, max: 10 },
                Code::ResourceExhausted,
                ("invalid", "header_list_too_large"),
            ),
            (
                Refusal::UnsupportedEncoding(Status::unimplemented("grpc-encoding x")),
                Code::Unimplemented,
                ("invalid", "unsupported_encoding"),
            ),
            (
                Refusal::FirstMessageTimeout { seconds: 30 },
                Code::DeadlineExceeded,
                ("invalid", "first_message_timeout"),
            ),
            (
                Refusal::from_frame_status(Status::resource_exhausted("big")),
                Code::ResourceExhausted,
                ("invalid", "message_too_large"),
            ),
            (
                Refusal::from_frame_status(Status::invalid_argument("trailing")),
                Code::InvalidArgument,
                ("invalid", "malformed_request"),
            ),
            (
                Refusal::InstanceNameTooLong { len: 9, max: 8 },
                Code::InvalidArgument,
                ("invalid", "instance_name_too_long"),
            ),
            (
                Refusal::Unauthenticated(Unauthenticated::Missing),
                Code::Unauthenticated,
                ("unauthenticated", "missing"),
            ),
            (
                Refusal::Denied {
                    reason: "no rule".to_string().into(),
                    anonymous: true,
                },
                Code::PermissionDenied,
                ("deny", "anonymous_no_rule"),
            ),
        ];
        for (refusal, code, labels) in cases {
            assert_eq!(refusal.code(), code, "{refusal:?}");
            assert_eq!(refusal.labels(), labels, "{refusal:?}");
            assert_eq!(refusal.status().code(), code);
            assert!(!refusal.to_string().is_empty());
        }
    }

    #[test]
    fn limits_are_named_in_their_messages() {
        let m = Refusal::HeaderList {
            size: 70000,
            max: 16384,
        }
        .to_string();
        assert!(
            m.contains("limits.max-header-list-bytes") && m.contains("16384"),
            "{m}"
        );
        let m = Refusal::InstanceNameTooLong {
            len: 1 << 20,
            max: 512,
        }
        .to_string();
        assert!(
            m.contains("limits.max-instance-name-bytes") && m.contains("512"),
            "{m}"
        );
        let m = Refusal::PendingBytes {
            key: "max-pending-bytes-per-connection",
            max: 5,
            anonymous: false,
        }
        .to_string();
        assert!(m.contains("limits.max-pending-bytes-per-connection"), "{m}");
    }

    #[test]
    fn an_unsupported_encoding_says_which_are() {
        let resp =
            Refusal::UnsupportedEncoding(Status::unimplemented("grpc-encoding br")).into_response();
        assert_eq!(
            resp.headers()["grpc-accept-encoding"],
            frame::ACCEPT_ENCODING
        );
        assert_eq!(resp.headers()["grpc-status"], "12");
    }
}
