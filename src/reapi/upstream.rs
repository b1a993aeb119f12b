//! Forwarding of upstream instances: an instance with `upstream:` sends every
//! request it is given (REAPI, ByteStream, Execution, Operations) to another
//! REAPI server, after the Gate admitted it.
//!
//! [`Upstream`] is a `tower::Service` over raw HTTP requests, so the Gate can
//! dispatch to it and a tonic client can be built over it. It forwards byte
//! for byte: the request and response bodies (streams included) pass through
//! untouched and trailers are preserved. The transport is a lazily connected
//! [`tonic::transport::Channel`] (hyper's HTTP/2 client with reconnection;
//! TLS by rustls with the configured CA and optional client certificate), so
//! one HTTP/2 connection is multiplexed for all callers.
//!
//! - Deadlines: the caller's `grpc-timeout` header goes upstream unchanged
//!   (the upstream enforces it) and gridgate also gives up waiting for the
//!   response headers when it expires (DEADLINE_EXCEEDED).
//! - Cancellation: when the caller goes away, hyper drops the response body,
//!   which resets the upstream HTTP/2 stream.
//! - Headers: `authorization`, `x-request-actor`, `x-request-subject` and
//!   `x-request-workflow` from the caller are removed (the upstream must never
//!   see the caller's token or self-asserted identity); the configured static
//!   `headers` are added (e.g. a service token); then, when the Gate put an
//!   [`Admission`] in the request extensions, its identity's actor, subject
//!   and workflow are sent as `x-request-*` (what BuildGrid's `method:
//!   headers` reads).
//! - Errors name no internals: a caller whose request cannot reach the
//!   upstream (it is unreachable, refuses the handshake, or the connection
//!   breaks mid-response) gets UNAVAILABLE "upstream for instance X
//!   unavailable" (DEADLINE_EXCEEDED "... did not answer before the
//!   deadline" when its deadline passed first), never the address or the
//!   transport error; those go to the log as a warning, the address without
//!   its `user:password@` ([`crate::config::without_userinfo`]).
//! - Instance-name rewriting (`instance-name:`): the requests whose first
//!   field names the instance (Capabilities, CAS, ActionCache, Execute),
//!   ByteStream resource names (Read, Write, QueryWriteStatus), operation
//!   names (WaitExecution, the Operations service) and ListOperations' name
//!   are re-encoded with the upstream name, message by message (compressed
//!   messages are decompressed and sent uncompressed); the operation names in
//!   responses (Execute, WaitExecution, Get/Wait/ListOperations) are renamed
//!   back to the public instance, so a client's later WaitExecution or
//!   GetOperation is admitted by the Gate on that instance.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use tonic::body::Body;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{
    without_userinfo, InstanceBackend, InstanceConfig, LimitsConfig, UpstreamConfig,
};
use crate::gate::admission::Admission;
use crate::gate::authn::{ACTOR_HEADER, CALLER_HEADERS, SUBJECT_HEADER, WORKFLOW_HEADER};
use crate::gate::frame::RefusalSlot;
use crate::gate::policy::show_instance;

mod dispatch;
mod rewrite;

pub use dispatch::DispatchLayer;

/// Why an upstream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// `address` is shown without its user-info.
    #[error("upstream {address}: {reason}")]
    Setup { address: String, reason: String },
}

/// A forwarder to one upstream REAPI server.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
    channel: Channel,
}

struct Inner {
    /// The public instance name, for the caller's error messages.
    instance: String,
    /// The configured address without its user-info, for the log.
    shown_address: String,
    /// The user-info of the configured address (`user:password@`), scrubbed
    /// from logged errors should a library ever quote the address.
    userinfo: Option<String>,
    headers: HeaderMap,
    rewrite: Option<rewrite::Rewrite>,
}

impl Upstream {
    /// A forwarder for the instance `public_name` configured with `cfg`.
    /// Connects lazily (on the first request); must be called within a tokio
    /// runtime. Reads the TLS files.
    pub fn new(public_name: &str, cfg: &UpstreamConfig) -> Result<Upstream, UpstreamError> {
        let max = crate::config::LimitsConfig::default().max_message_bytes;
        let limits = crate::gate::frame::Limits {
            max_message: max,
            max_decompressed: max,
        };
        Upstream::with_limits(public_name, cfg, limits)
    }

    /// The same, with the message limits of `limits.max-message-bytes`
    /// for the messages it rewrites.
    pub fn with_limits(
        public_name: &str,
        cfg: &UpstreamConfig,
        limits: crate::gate::frame::Limits,
    ) -> Result<Upstream, UpstreamError> {
        let err = |reason: String| UpstreamError::Setup {
            address: cfg.shown_address(),
            reason,
        };
        // User-info in the address is never sent: it would go upstream in
        // `:authority` and spoil the TLS server name (gRPC has no use for it;
        // credentials belong in `headers:`).
        let address = without_userinfo(&cfg.address);
        if address != cfg.address {
            tracing::warn!(
                instance = %show_instance(public_name),
                upstream = %address,
                "the upstream address has user:password@, which is not sent; put credentials in headers:"
            );
        }
        let host_port = address
            .split_once("://")
            .map(|(_, rest)| rest.trim_end_matches('/'))
            .ok_or_else(|| err("needs grpc:// or grpcs://".into()))?;
        let scheme = if cfg.tls { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host_port}"))
            .map_err(|e| err(format!("not a valid address: {e}")))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if cfg.tls {
            let ca_path = cfg.tls_ca.as_ref().ok_or_else(|| {
                err("grpcs:// needs tls-ca: gridgate does not use the system's trust store for upstreams".into())
            })?;
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| err(format!("cannot read {}: {e}", p.display())))
            };
            let mut tls =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca_path)?));
            if let Some(host) = host_port
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']))
            {
                tls = tls.domain_name(host.to_string());
            }
            if let (Some(cert), Some(key)) = (&cfg.tls_client_cert, &cfg.tls_client_key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| err(format!("TLS setup: {e}")))?;
        }
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| err(format!("header name {k:?} is not valid")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| err(format!("header {k}: value is not a valid header value")))?;
            headers.insert(name, value);
        }
        let rewrite = match &cfg.instance_name {
            Some(upstream) if upstream != public_name => {
                Some(rewrite::Rewrite::new(public_name, upstream, limits))
            }
            _ => None,
        };
        Ok(Upstream {
            inner: Arc::new(Inner {
                instance: public_name.to_string(),
                shown_address: cfg.shown_address(),
                userinfo: userinfo(&cfg.address),
                headers,
                rewrite,
            }),
            channel: endpoint.connect_lazy(),
        })
    }

    /// The configured address without its user-info.
    pub fn shown_address(&self) -> &str {
        &self.inner.shown_address
    }

    fn prepare(
        &self,
        mut req: http::Request<Body>,
    ) -> Result<(http::Request<Body>, Option<rewrite::ResponseRewrite>), tonic::Status> {
        let admission = req.extensions().get::<Admission>().cloned();
        let headers = req.headers_mut();
        for h in CALLER_HEADERS {
            headers.remove(h);
        }
        for (k, v) in &self.inner.headers {
            headers.insert(k.clone(), v.clone());
        }
        if let Some(a) = admission {
            let id = &a.identity;
            for (name, value) in [
                (ACTOR_HEADER, &id.actor),
                (SUBJECT_HEADER, &id.subject),
                (WORKFLOW_HEADER, &id.workflow),
            ] {
                if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                    headers.insert(name, v);
                }
            }
        }
        match &self.inner.rewrite {
            Some(r) => r.apply(req),
            None => Ok((req, None)),
        }
    }
}

impl Inner {
    fn scrub(&self, text: &str) -> String {
        match &self.userinfo {
            Some(u) => text.replace(u.as_str(), ""),
            None => text.to_string(),
        }
    }

    /// The caller's status for a failure to reach the upstream (or to read its
    /// response): the instance only. The address and the error chain go to
    /// the log.
    fn transport_status(&self, e: &(dyn std::error::Error + 'static)) -> tonic::Status {
        let mut detail = e.to_string();
        let mut source = e.source();
        let mut timed_out = e.is::<tonic::TimeoutExpired>();
        while let Some(s) = source {
            timed_out |= s.is::<tonic::TimeoutExpired>();
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            source = s.source();
        }
        let instance = show_instance(&self.instance);
        tracing::warn!(
            instance = %instance,
            upstream = %self.shown_address,
            error = %self.scrub(&detail),
            "upstream request failed"
        );
        if timed_out {
            tonic::Status::deadline_exceeded(format!(
                "upstream for instance {instance} did not answer before the deadline"
            ))
        } else {
            tonic::Status::unavailable(format!("upstream for instance {instance} unavailable"))
        }
    }
}

/// The `user:password@` of an address, if it has one.
fn userinfo(address: &str) -> Option<String> {
    let shown = without_userinfo(address);
    let start = address.find("://").map_or(0, |i| i + 3);
    let len = address.len().checked_sub(shown.len())?;
    (len > 0).then(|| address[start..start + len].to_string())
}

/// The upstream's response, its body passed on as it is (trailers included)
/// unless the connection breaks mid-stream: then the stream ends with the
/// caller's status in trailers (see [`Inner::transport_status`]).
fn guard_body(inner: Arc<Inner>, resp: http::Response<Body>) -> http::Response<Body> {
    resp.map(|body| {
        Body::new(GuardedBody {
            body,
            inner,
            ended: false,
        })
    })
}

struct GuardedBody {
    body: Body,
    inner: Arc<Inner>,
    ended: bool,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.ended = true;
                let status = self.inner.transport_status(&e);
                let mut trailers = HeaderMap::new();
                Poll::Ready(Some(match status.add_header(&mut trailers) {
                    Ok(()) => Ok(http_body::Frame::trailers(trailers)),
                    Err(status) => Err(status),
                }))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl tower::Service<http::Request<Body>> for Upstream {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The channel's readiness is awaited per call (on a clone), so one
        // slow upstream connection never blocks the caller's service stack.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        // A client stream the Gate refuses part-way is cut off upstream; the
        // caller is told the Gate's reason, not the transport error.
        let slot = req.extensions().get::<RefusalSlot>().cloned();
        Box::pin(async move {
            let (req, response) = match this.prepare(req) {
                Ok(r) => r,
                Err(status) => return Ok(status.into_http()),
            };
            let resp = match tower::ServiceExt::oneshot(this.channel.clone(), req).await {
                Ok(resp) => {
                    let resp = guard_body(this.inner.clone(), resp);
                    match response {
                        Some(rewrite) => rewrite.apply(resp),
                        None => resp,
                    }
                }
                Err(e) => match slot.as_ref().and_then(RefusalSlot::get) {
                    Some(refusal) => return Ok(refusal.clone().into_http()),
                    None => this.inner.transport_status(&e).into_http(),
                },
            };
            Ok(match slot {
                Some(slot) => prefer_refusal(resp, slot),
                None => resp,
            })
        })
    }
}

/// The response, with its status replaced by the Gate's refusal of the
/// request body if there was one.
fn prefer_refusal(resp: http::Response<Body>, slot: RefusalSlot) -> http::Response<Body> {
    if let Some(refusal) = slot.get() {
        return refusal.clone().into_http();
    }
    resp.map(|inner| {
        Body::new(RefusedOr {
            inner,
            slot,
            done: false,
        })
    })
}

/// A response body whose end reports the Gate's refusal, when the request
/// body was refused while the response was streaming.
struct RefusedOr {
    inner: Body,
    slot: RefusalSlot,
    done: bool,
}

impl RefusedOr {
    fn refusal_trailers(&mut self) -> Option<http::HeaderMap> {
        let refusal = self.slot.get()?;
        self.done = true;
        Some(crate::gate::frame::status_trailers(refusal))
    }
}

impl http_body::Body for RefusedOr {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => match self.refusal_trailers() {
                Some(t) => Poll::Ready(Some(Ok(http_body::Frame::trailers(t)))),
                None => Poll::Ready(Some(Ok(frame))),
            },
            Poll::Ready(Some(Err(e))) => match self.refusal_trailers() {
                Some(t) => Poll::Ready(Some(Ok(http_body::Frame::trailers(t)))),
                None => Poll::Ready(Some(Err(e))),
            },
            Poll::Ready(None) => match self.refusal_trailers() {
                Some(t) => Poll::Ready(Some(Ok(http_body::Frame::trailers(t)))),
                None => Poll::Ready(None),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.inner.is_end_stream() && self.slot.get().is_none())
    }
}

/// The upstream instances of a config, by public instance name.
#[derive(Clone, Default)]
pub struct Upstreams {
    by_name: HashMap<String, Upstream>,
}

impl Upstreams {
    /// Builds a forwarder for every upstream instance in `config` (must be
    /// called within a tokio runtime; nothing connects until used).
    pub fn new(
        instances: &[InstanceConfig],
        limits: &LimitsConfig,
    ) -> Result<Upstreams, UpstreamError> {
        let mut by_name = HashMap::new();
        let max = limits.max_message_bytes;
        let limits = crate::gate::frame::Limits {
            max_message: max,
            max_decompressed: max,
        };
        for i in instances {
            if let InstanceBackend::Upstream(u) = &i.backend {
                by_name.insert(i.name.clone(), Upstream::with_limits(&i.name, u, limits)?);
            }
        }
        Ok(Upstreams { by_name })
    }

    /// Forwarders by public instance name (for tests and tools).
    pub fn from_map(by_name: impl IntoIterator<Item = (String, Upstream)>) -> Upstreams {
        Upstreams {
            by_name: by_name.into_iter().collect(),
        }
    }

    /// The forwarder for `instance`, if it is an upstream instance.
    pub fn get(&self, instance: &str) -> Option<Upstream> {
        self.by_name.get(instance).cloned()
    }

    /// Whether there are no upstream instances.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}
