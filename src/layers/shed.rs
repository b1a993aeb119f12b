//! Load shedding: at most `limits.max-concurrent-requests` RPCs in progress
//! (from arrival to the end of the response, streams included) across all
//! connections; one more is answered RESOURCE_EXHAUSTED at once, never
//! queued (queueing would only grow latency and memory).
//!
//! ```
//! # use gridgate::layers::shed::ShedLayer;
//! # use tower::Layer;
//! let svc = ShedLayer::new(10_000).layer(tower::service_fn(
//!     |_req: http::Request<tonic::body::Body>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
//!     },
//! ));
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Status;
use tower::{Layer, Service};

use crate::budget::{Budget, Held};

/// Sheds requests beyond a number in progress.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    in_flight: Arc<Budget>,
}

impl ShedLayer {
    /// At most `max` requests in progress.
    pub fn new(max: usize) -> ShedLayer {
        ShedLayer {
            in_flight: Budget::new(max),
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            in_flight: self.in_flight.clone(),
        }
    }
}

/// The service [`ShedLayer`] makes.
#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    in_flight: Arc<Budget>,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Shed<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Default,
{
    type Response = Response<Permitted<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        match self.in_flight.try_take(1) {
            Some(permit) => ResponseFuture::Called {
                inner: self.inner.call(req),
                permit: Some(permit),
            },
            None => {
                crate::metrics::gate_decision("shed", "max_concurrent_requests");
                ResponseFuture::Shed {
                    max: self.in_flight.max(),
                }
            }
        }
    }
}

pin_project! {
    /// The response, holding its place until its body ends.
    // pin_project_lite takes no attributes but `#[pin]` on the fields of an
    // enum's variants, so they cannot carry doc comments: `inner` is the inner
    // service's response future, `permit` the in-flight slot (moved into the
    // response body when the response arrives), `max` the in-flight limit for
    // the refusal's message.
    #[allow(missing_docs)]
    #[project = Projected]
    pub enum ResponseFuture<F> {
        /// Admitted to the inner service.
        Called {
            #[pin]
            inner: F,
            permit: Option<Held>,
        },
        /// Refused: the limit was reached.
        Shed { max: usize },
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Default,
{
    type Output = Result<Response<Permitted<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Called { inner, permit } => {
                let resp = ready!(inner.poll(cx))?;
                let permit = permit.take();
                Poll::Ready(Ok(resp.map(|inner| Permitted {
                    inner,
                    _permit: permit,
                })))
            }
            Projected::Shed { max } => Poll::Ready(Ok(Status::resource_exhausted(format!(
                "gridgate is at its limit of {max} requests in progress; retry with backoff"
            ))
            .into_http())),
        }
    }
}

/// A response body that holds its request's place until it is dropped.
#[derive(Debug, Default)]
pub struct Permitted<B> {
    inner: B,
    _permit: Option<Held>,
}

impl<B> HttpBody for Permitted<B>
where
    B: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tonic::body::Body;
    use tower::ServiceExt;

    #[tokio::test]
    async fn the_request_over_the_limit_is_shed_and_places_come_back_with_the_body() {
        let layer = ShedLayer::new(1);
        let svc = layer.layer(tower::service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Body::empty()))
        }));
        let first = svc.clone().oneshot(Request::new(())).await.unwrap();
        assert!(first.headers().get("grpc-status").is_none());
        let shed = svc.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(shed.headers()["grpc-status"], "8");
        drop(first);
        let again = svc.oneshot(Request::new(())).await.unwrap();
        assert!(
            again.headers().get("grpc-status").is_none(),
            "the place came back"
        );
    }
}
