//! Measures each RPC to its end: the status code is read from the response
//! (a Trailers-Only header, or the trailers after the last message), the
//! duration runs from the request's arrival to then. A response dropped
//! before its end (the client went away) counts as CANCELLED.
//!
//! Layers inside it say what they learned by putting an [`Observation`]
//! (the Gate: the RPC and the instance's bounded label) or [`Forwarded`]
//! (upstream dispatch) into the response's extensions. With no metrics
//! output and no request log configured, nothing is measured and the body
//! passes untouched.
//!
//! ```
//! # use gridgate::layers::observe::ObserveLayer;
//! # use tower::Layer;
//! let svc = ObserveLayer::new(|_path: &str| None).layer(tower::service_fn(
//!     |_req: http::Request<tonic::body::Body>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
//!     },
//! ));
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use metrics::SharedString;
use pin_project_lite::pin_project;
use tonic::{Code, Status};
use tower::{Layer, Service};

/// What the Gate learned of a request, for its metrics.
#[derive(Debug, Clone)]
pub struct Observation {
    /// The fully-qualified service.
    pub service: &'static str,
    /// The RPC name.
    pub method: &'static str,
    /// The instance's metric label (bounded: see [`crate::metrics::instance_label`]).
    pub instance: SharedString,
}

/// Marks a response that came from an upstream.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded;

/// The (service, method) labels of a request path the Gate never saw.
pub type Labels = Arc<dyn Fn(&str) -> Option<(&'static str, &'static str)> + Send + Sync>;

/// Measures every RPC to the end of its response.
#[derive(Clone)]
pub struct ObserveLayer {
    labels: Labels,
}

impl ObserveLayer {
    /// `labels` names the RPC of a path when no layer inside said (a request
    /// shed before the Gate).
    pub fn new(
        labels: impl Fn(&str) -> Option<(&'static str, &'static str)> + Send + Sync + 'static,
    ) -> ObserveLayer {
        ObserveLayer {
            labels: Arc::new(labels),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            labels: self.labels.clone(),
        }
    }
}

/// The service [`ObserveLayer`] makes.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    labels: Labels,
}

/// Whether anyone is listening: a metrics output or the request log.
fn measured() -> bool {
    crate::metrics::enabled()
        || tracing::enabled!(target: "gridgate::request", tracing::Level::DEBUG)
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Observe<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<Observed<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let start = measured().then(|| Start {
            at: Instant::now(),
            request_id: req.headers().get(super::request_id::HEADER).cloned(),
            labels: (self.labels)(req.uri().path()),
        });
        ResponseFuture {
            inner: self.inner.call(req),
            start,
        }
    }
}

/// What is known when the request arrives.
struct Start {
    at: Instant,
    request_id: Option<HeaderValue>,
    labels: Option<(&'static str, &'static str)>,
}

pin_project! {
    /// The response, its body measured.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        start: Option<Start>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Observed<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut resp = ready!(this.inner.poll(cx))?;
        let pending = this.start.take().map(|start| {
            let seen = resp.extensions_mut().remove::<Observation>();
            let upstream = resp.extensions().get::<Forwarded>().is_some();
            let (service, method) = match &seen {
                Some(o) => (o.service, o.method),
                None => start.labels.unwrap_or(("unknown", "unknown")),
            };
            Pending {
                service,
                method,
                instance: seen.map_or(SharedString::const_str(""), |o| o.instance),
                upstream,
                started: start.at,
                request_id: start.request_id,
            }
        });
        let mut pending = pending;
        // Trailers-Only: the status is already in the headers, the RPC is over.
        if let Some(code) = status_of(resp.headers()) {
            if let Some(p) = pending.take() {
                p.finish(code);
            }
        }
        Poll::Ready(Ok(resp.map(|inner| Observed { inner, pending })))
    }
}

/// What is recorded when the RPC ends.
struct Pending {
    service: &'static str,
    method: &'static str,
    instance: SharedString,
    upstream: bool,
    started: Instant,
    request_id: Option<HeaderValue>,
}

impl Pending {
    fn finish(self, code: Code) {
        let elapsed = self.started.elapsed();
        crate::metrics::record_rpc(self.service, self.method, &self.instance, code, elapsed);
        if self.upstream && code != Code::Ok {
            crate::metrics::upstream_error(&self.instance, code);
        }
        tracing::debug!(
            target: "gridgate::request",
            request_id = self.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
            service = self.service,
            method = self.method,
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

/// A response body measured to its end.
#[derive(Default)]
pub struct Observed<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B> Observed<B> {
    fn finish(&mut self, code: Code) {
        if let Some(p) = self.pending.take() {
            p.finish(code);
        }
    }
}

impl<B> HttpBody for Observed<B>
where
    B: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if self.pending.is_some() {
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
                // which happens when the client goes away mid-call, so the
                // client never saw a status.
                Poll::Ready(None) => self.finish(Code::Cancelled),
                Poll::Pending => {}
            }
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

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use tonic::body::Body;
    use tower::ServiceExt;

    #[tokio::test]
    async fn bodies_pass_through_unchanged() {
        let svc = ObserveLayer::new(|_| Some(("svc", "Rpc"))).layer(tower::service_fn(
            |_req: Request<Body>| async {
                let mut t = HeaderMap::new();
                t.insert("grpc-status", HeaderValue::from_static("0"));
                let frames = vec![
                    Ok::<_, Status>(Frame::data(Bytes::from_static(b"abc"))),
                    Ok(Frame::trailers(t)),
                ];
                let body = Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
                    frames,
                )));
                Ok::<_, Infallible>(Response::new(body))
            },
        ));
        let resp = svc.oneshot(Request::new(Body::empty())).await.unwrap();
        let collected = resp.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(&collected.to_bytes()[..], b"abc");
    }

    #[test]
    fn statuses_are_read_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(status_of(&h), None);
        h.insert("grpc-status", HeaderValue::from_static("7"));
        assert_eq!(status_of(&h), Some(Code::PermissionDenied));
    }
}
