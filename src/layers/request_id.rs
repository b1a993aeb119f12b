//! Every request has an id: the client's `x-request-id` when it sends a
//! usable one (1 to 128 visible ASCII characters), a fresh 32-hex-digit id
//! otherwise. The id is set on the request (so the audit line names it and an
//! upstream sees it) and returned in the response's `x-request-id`.
//!
//! ```
//! # use gridgate::layers::request_id::RequestIdLayer;
//! # use tower::{Layer, ServiceExt};
//! # tokio_test_block_on(async {
//! let svc = RequestIdLayer.layer(tower::service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(()))
//! }));
//! let resp = svc.oneshot(http::Request::new(())).await.unwrap();
//! assert_eq!(resp.headers()["x-request-id"].len(), 32);
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{ready, Context, Poll};

use http::{HeaderMap, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// The request id header.
pub const HEADER: &str = "x-request-id";

/// The longest client-chosen id kept.
pub const MAX_LEN: usize = 128;

/// Gives every request an id and returns it on the response.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;
    fn layer(&self, inner: S) -> RequestId<S> {
        RequestId { inner }
    }
}

/// The service [`RequestIdLayer`] makes.
#[derive(Debug, Clone)]
pub struct RequestId<S> {
    inner: S,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RequestId<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let id = assign(req.headers_mut());
        ResponseFuture {
            inner: self.inner.call(req),
            id: Some(id),
        }
    }
}

pin_project! {
    /// The response, with the request's id in its headers.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut resp = ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take() {
            resp.headers_mut().insert(HEADER, id);
        }
        Poll::Ready(Ok(resp))
    }
}

/// Takes the client's id or makes one, and sets it on the request. The
/// value is marked sensitive: a fresh id per request is never worth a place
/// in HPACK's dynamic table (every insert would evict another header).
pub fn assign(headers: &mut HeaderMap) -> HeaderValue {
    match headers.entry(HEADER) {
        http::header::Entry::Occupied(mut e) => {
            let v = e.get();
            let ok = !v.is_empty()
                && v.len() <= MAX_LEN
                && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
            if ok && e.iter().count() == 1 {
                return v.clone();
            }
            let id = generate();
            e.insert(id.clone());
            id
        }
        http::header::Entry::Vacant(e) => e.insert(generate()).clone(),
    }
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
    let mut v = HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("0"));
    v.set_sensitive(true);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

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
        h.append(HEADER, HeaderValue::from_static("a"));
        h.append(HEADER, HeaderValue::from_static("b"));
        let id = assign(&mut h);
        assert_eq!(id.len(), 32, "two ids: a fresh one");
        assert_eq!(h.get_all(HEADER).iter().count(), 1);

        let mut h = HeaderMap::new();
        let a = assign(&mut h);
        let mut h = HeaderMap::new();
        let b = assign(&mut h);
        assert_ne!(a, b);
        assert!(a.is_sensitive());
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

    #[tokio::test]
    async fn the_id_the_service_saw_is_the_one_returned() {
        let svc = RequestIdLayer.layer(tower::service_fn(|req: Request<()>| async move {
            let mut resp = Response::new(());
            // Echo what the service saw, to compare.
            resp.extensions_mut().insert(req.headers()[HEADER].clone());
            Ok::<_, Infallible>(resp)
        }));
        let resp = svc.clone().oneshot(Request::new(())).await.unwrap();
        let seen = resp.extensions().get::<HeaderValue>().unwrap();
        assert_eq!(&resp.headers()[HEADER], seen);

        let mut req = Request::new(());
        req.headers_mut()
            .insert(HEADER, HeaderValue::from_static("mine"));
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.headers()[HEADER], "mine");
    }
}
