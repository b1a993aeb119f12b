//! Measures each RPC to its end: the status code is read from the response
//! (a Trailers-Only header, or the trailers after the last message), the
//! duration runs from the request's arrival to then. A response dropped
//! before its end (the client went away) counts as CANCELLED. The request's
//! in-flight permit (`limits.max-concurrent-requests`) is held to the same end.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, HeaderValue, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::{Code, Status};

use super::layer::{Outcome, Permits};

/// What is recorded when the RPC ends.
struct Pending {
    outcome: Outcome,
    started: Instant,
    request_id: HeaderValue,
}

impl Pending {
    fn finish(self, code: Code) {
        let (service, method) = match &self.outcome.route {
            Some(r) => (r.service, r.rpc),
            None => ("unknown", "unknown"),
        };
        let elapsed = self.started.elapsed();
        crate::metrics::record_rpc(service, method, &self.outcome.instance, code, elapsed);
        if self.outcome.upstream && code != Code::Ok {
            crate::metrics::upstream_error(&self.outcome.instance, code);
        }
        tracing::debug!(
            target: "gridgate::request",
            request_id = self.request_id.to_str().unwrap_or(""),
            service,
            method,
            code = crate::metrics::code_name(code),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request finished"
        );
    }
}

fn status_of(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

/// Wraps the response so that its end is measured (when anyone is listening)
/// and the permit released then.
pub(crate) fn observe(
    resp: Response<Body>,
    outcome: Outcome,
    started: Instant,
    request_id: HeaderValue,
    permit: Option<Permits>,
) -> Response<Body> {
    let measured = crate::metrics::enabled()
        || tracing::enabled!(target: "gridgate::request", tracing::Level::DEBUG);
    let pending = measured.then_some(Pending {
        outcome,
        started,
        request_id,
    });
    // Trailers-Only: the status is already in the headers, the RPC is over.
    if let Some(code) = status_of(resp.headers()) {
        if let Some(p) = pending {
            p.finish(code);
        }
        return resp;
    }
    if pending.is_none() && permit.is_none() {
        return resp;
    }
    resp.map(|inner| {
        Body::new(Observed {
            inner,
            pending,
            _permit: permit,
        })
    })
}

struct Observed {
    inner: Body,
    pending: Option<Pending>,
    _permit: Option<Permits>,
}

impl Observed {
    fn finish(&mut self, code: Code) {
        if let Some(p) = self.pending.take() {
            p.finish(code);
        }
    }
}

impl HttpBody for Observed {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = status_of(trailers).unwrap_or(Code::Unknown);
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                let code = status.code();
                self.finish(code);
            }
            // The body ended without trailers: the response was cut short,
            // which happens when the client goes away mid-call (measured:
            // only at the end of duration-bounded load runs), so the client
            // never saw a status.
            Poll::Ready(None) => self.finish(Code::Cancelled),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}
