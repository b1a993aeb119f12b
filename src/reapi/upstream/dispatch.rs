//! Upstream dispatch: an admitted REAPI request (CAS, ByteStream,
//! ActionCache, Execution, Operations, Capabilities) for an instance with an
//! `upstream:` goes to that upstream instead of the local service. The
//! response is marked [`Forwarded`] for the metrics.
//!
//! It sits right under the Gate and looks only at what the Gate admitted
//! (the [`Admission`]'s instance), so a request the Gate refused, or one for
//! a service that is not REAPI (BES, health), never reaches an upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tonic::body::Body;
use tower::{Layer, Service};

use super::{Upstream, Upstreams};
use crate::gate::admission::Admission;
use crate::layers::observe::Forwarded;

/// The services whose requests an upstream instance forwards.
const FORWARDED_SERVICES: [&str; 3] = [
    "build.bazel.remote.execution.v2.",
    "google.bytestream.ByteStream/",
    "google.longrunning.Operations/",
];

/// Sends admitted REAPI requests of upstream instances to their upstream.
#[derive(Clone)]
pub struct DispatchLayer {
    upstreams: Arc<Upstreams>,
}

impl DispatchLayer {
    /// Dispatches to `upstreams`.
    pub fn new(upstreams: Arc<Upstreams>) -> DispatchLayer {
        DispatchLayer { upstreams }
    }
}

impl<S> Layer<S> for DispatchLayer {
    type Service = Dispatch<S>;
    fn layer(&self, inner: S) -> Dispatch<S> {
        Dispatch {
            inner,
            upstreams: self.upstreams.clone(),
        }
    }
}

/// The service [`DispatchLayer`] makes.
#[derive(Clone)]
pub struct Dispatch<S> {
    inner: S,
    upstreams: Arc<Upstreams>,
}

/// The upstream an admitted request goes to, if its instance has one.
fn upstream_for(upstreams: &Upstreams, req: &Request<Body>) -> Option<Upstream> {
    if upstreams.is_empty() {
        return None;
    }
    let path = req.uri().path().strip_prefix('/')?;
    if !FORWARDED_SERVICES.iter().any(|s| path.starts_with(s)) {
        return None;
    }
    let admission = req.extensions().get::<Admission>()?;
    upstreams.get(admission.instance.as_deref()?)
}

impl<S> Service<Request<Body>> for Dispatch<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        match upstream_for(&self.upstreams, &req) {
            Some(mut upstream) => ResponseFuture::Upstream {
                inner: upstream.call(req),
            },
            None => ResponseFuture::Local {
                inner: self.inner.call(req),
            },
        }
    }
}

pin_project! {
    /// The local service's response, or the upstream's.
    #[project = Projected]
    pub enum ResponseFuture<F> {
        /// From the local service.
        Local { #[pin] inner: F },
        /// From the upstream.
        Upstream { #[pin] inner: <Upstream as Service<Request<Body>>>::Future },
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Local { inner } => inner.poll(cx),
            Projected::Upstream { inner } => inner.poll(cx).map(|r| {
                let mut resp = match r {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                };
                resp.extensions_mut().insert(Forwarded);
                Ok(resp)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;
    use std::convert::Infallible;
    use tower::ServiceExt;

    fn local(
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = impl Send>
           + Clone {
        tower::service_fn(|_req: Request<Body>| async {
            let mut resp = Response::new(Body::empty());
            resp.headers_mut()
                .insert("served-by", "local".parse().unwrap());
            Ok::<_, Infallible>(resp)
        })
    }

    fn admitted(path: &str, instance: &str) -> Request<Body> {
        let mut req = Request::builder().uri(path).body(Body::empty()).unwrap();
        req.extensions_mut()
            .insert(Admission::anonymous_allow_all(Some(instance.into()), "Rpc"));
        req
    }

    #[tokio::test]
    async fn only_admitted_reapi_requests_of_upstream_instances_are_forwarded() {
        // An upstream that cannot be reached: forwarded requests answer UNAVAILABLE.
        let cfg = UpstreamConfig {
            address: "grpc://127.0.0.1:9".into(),
            tls: false,
            tls_ca: None,
            tls_client_cert: None,
            tls_client_key: None,
            headers: Default::default(),
            instance_name: None,
        };
        let upstreams = Arc::new(Upstreams::from_map([(
            "far".to_string(),
            Upstream::new("far", &cfg).unwrap(),
        )]));
        let svc = DispatchLayer::new(upstreams).layer(local());
        let cas = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
        let resp = svc.clone().oneshot(admitted(cas, "far")).await.unwrap();
        assert!(resp.extensions().get::<Forwarded>().is_some());
        assert!(resp.headers().get("served-by").is_none());
        // Another instance, a non-REAPI service, a request without an Admission: local.
        for req in [
            admitted(cas, "near"),
            admitted(
                "/google.devtools.build.v1.PublishBuildEvent/PublishLifecycleEvent",
                "far",
            ),
            Request::builder().uri(cas).body(Body::empty()).unwrap(),
        ] {
            let resp = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.headers()["served-by"], "local");
        }
    }
}
