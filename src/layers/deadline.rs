//! The caller's deadline: a request whose `grpc-timeout` expires before its
//! response has begun is answered DEADLINE_EXCEEDED, and whatever was
//! preparing the response (the Gate waiting for a first message, an upstream
//! call) is dropped.
//!
//! The deadline covers the wait for the response headers, as gRPC servers do;
//! a stream that has started answering is the service's to end.
//!
//! ```
//! # use gridgate::layers::deadline::DeadlineLayer;
//! let stack = tower::ServiceBuilder::new()
//!     .layer(DeadlineLayer)
//!     .service(tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
//!     }));
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{HeaderMap, Request, Response};
use pin_project_lite::pin_project;
use tonic::Status;
use tower::{Layer, Service};

/// Applies the caller's `grpc-timeout`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

/// The service [`DeadlineLayer`] makes.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Deadline<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Default,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let sleep = grpc_timeout(req.headers()).map(tokio::time::sleep);
        ResponseFuture {
            inner: self.inner.call(req),
            sleep,
        }
    }
}

pin_project! {
    /// The response, or DEADLINE_EXCEEDED when the deadline comes first.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Default,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(out);
        }
        if let Some(sleep) = this.sleep.as_pin_mut() {
            ready!(sleep.poll(cx));
            return Poll::Ready(Ok(Status::deadline_exceeded(
                "the call's deadline (grpc-timeout) passed before its response began",
            )
            .into_http()));
        }
        Poll::Pending
    }
}

/// The `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
/// A malformed value is ignored, as gRPC servers do.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tonic::body::Body;
    use tower::ServiceExt;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", v.parse().unwrap());
        h
    }

    #[test]
    fn parses_every_unit_and_ignores_garbage() {
        assert_eq!(
            grpc_timeout(&headers("2H")),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(grpc_timeout(&headers("3M")), Some(Duration::from_secs(180)));
        assert_eq!(grpc_timeout(&headers("10S")), Some(Duration::from_secs(10)));
        assert_eq!(
            grpc_timeout(&headers("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(grpc_timeout(&headers("7u")), Some(Duration::from_micros(7)));
        assert_eq!(
            grpc_timeout(&headers("99999999n")),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "123456789S", "10s", "-1S", "1.5S", "10"] {
            assert_eq!(grpc_timeout(&headers(bad)), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn a_slow_response_is_deadline_exceeded_and_a_fast_one_passes() {
        let slow = tower::service_fn(|_req: Request<Body>| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, Infallible>(Response::new(Body::empty()))
        });
        let mut req = Request::new(Body::empty());
        req.headers_mut()
            .insert("grpc-timeout", "20m".parse().unwrap());
        let resp = DeadlineLayer.layer(slow).oneshot(req).await.unwrap();
        assert_eq!(resp.headers()["grpc-status"], "4");

        let fast = tower::service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::empty()))
        });
        let mut req = Request::new(Body::empty());
        req.headers_mut()
            .insert("grpc-timeout", "1S".parse().unwrap());
        let resp = DeadlineLayer.layer(fast).oneshot(req).await.unwrap();
        assert!(resp.headers().get("grpc-status").is_none());
    }
}
