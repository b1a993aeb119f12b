//! The Gate as a tower layer: every request passes here before any service,
//! and nothing else happens here but admission (see [`super::admit`] for
//! its stages). UNAUTHENTICATED means the credentials are missing,
//! malformed, expired or unverifiable; PERMISSION_DENIED means the caller is
//! known (or anonymous on an instance that admits anonymous callers) but no
//! rule allows the call. Messages say why and never contain a token.
//!
//! An admitted request reaches the inner service with its
//! [`super::Admission`] in the extensions; an open-route or anonymous
//! request keeps its place under the anonymous share (see
//! [`super::shares`]) until its response body is dropped.
//!
//! ```no_run
//! # fn f(gate: std::sync::Arc<gridgate::gate::Gate>, routes: tonic::service::Routes) {
//! let stack = tower::ServiceBuilder::new()
//!     .layer(gridgate::gate::GateLayer::new(gate))
//!     .service(routes);
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service};

use super::admit::{self, Admitted, Refused};
use super::shares::AnonymousPlace;
use super::Gate;

/// Puts the [`Gate`] in front of a service.
#[derive(Clone)]
pub struct GateLayer {
    gate: Arc<Gate>,
}

impl GateLayer {
    /// The Gate in front of whatever it layers.
    pub fn new(gate: Arc<Gate>) -> GateLayer {
        GateLayer { gate }
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = GateService<S>;
    fn layer(&self, inner: S) -> GateService<S> {
        GateService {
            gate: self.gate.clone(),
            inner,
        }
    }
}

/// The service the [`GateLayer`] produces.
#[derive(Clone)]
pub struct GateService<S> {
    gate: Arc<Gate>,
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<Request<Body>> for GateService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<GateBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<GateBody>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The clone that was made ready is the one we call (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        Box::pin(async move {
            match admit::admit(&gate, req).await {
                Ok(Admitted {
                    request,
                    place,
                    observation,
                }) => {
                    let mut resp = inner.call(request).await?;
                    if let Some(o) = observation {
                        resp.extensions_mut().insert(o);
                    }
                    Ok(resp.map(|inner| GateBody {
                        inner,
                        _place: place,
                    }))
                }
                Err(Refused {
                    response,
                    observation,
                }) => {
                    let mut resp = response.map(|inner| GateBody {
                        inner,
                        _place: None,
                    });
                    if let Some(o) = observation {
                        resp.extensions_mut().insert(o);
                    }
                    Ok(resp)
                }
            }
        })
    }
}

/// A response body of a request the Gate decided on; an open-route or
/// anonymous request holds its place under the anonymous share until it is
/// dropped.
#[derive(Default)]
pub struct GateBody {
    inner: Body,
    _place: Option<AnonymousPlace>,
}

impl HttpBody for GateBody {
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
