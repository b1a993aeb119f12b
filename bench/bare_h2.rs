//! The ceiling for the Gate benchmarks: a bare hyper HTTP/2 server on the
//! same runtime and settings as gridgate's, answering every request with a
//! fixed gRPC reply after reading the request body. What it costs per request
//! is the part of gridgate's cost that is HTTP/2 and tokio, not gridgate.
//!
//! ```text
//! cargo run --release --example bare_h2 -- [ADDR]     (default 127.0.0.1:0)
//! ```
//!
//! Prints `listening on ADDR` like gridgate, so bench/gate_h2load.sh can run
//! it as the `bare` case. The reply is what gridgate answers a
//! FindMissingBlobs of 10 digests that are all present: an empty
//! FindMissingBlobsResponse, then `grpc-status: 0`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

/// One DATA frame, then the trailers.
type Reply = http_body_util::StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
>;

async fn answer(req: Request<Incoming>) -> Result<Response<Reply>, Infallible> {
    // Read the request to its end, as a gRPC server must.
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = vec![
        Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut resp = Response::new(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames,
    )));
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(resp)
}

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            eprintln!("listening on {}", listener.local_addr()?);
            loop {
                let (tcp, _) = listener.accept().await?;
                let _ = tcp.set_nodelay(true);
                tokio::spawn(async move {
                    let mut builder =
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    builder
                        .timer(TokioTimer::new())
                        .keep_alive_interval(Duration::from_secs(30))
                        .max_concurrent_streams(1024)
                        .max_frame_size(256 * 1024)
                        .auto_date_header(false);
                    let _ = builder
                        .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(answer))
                        .await;
                });
            }
        })
}
