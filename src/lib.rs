//! gridgate: an auth-first gRPC gateway for build infrastructure.
//!
//! A request reaches a service only after the gateway has checked who is
//! calling and whether that caller may make this call on this instance. See
//! the README for the request path and the config reference.

/// Applies the configured response compression to a generated tonic server,
/// and lets it accept gzip, zstd and deflate requests.
macro_rules! compressed {
    ($svc:expr, $compression:expr) => {{
        use tonic::codec::CompressionEncoding;
        let svc = $svc
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .accept_compressed(CompressionEncoding::Deflate);
        match $compression {
            $crate::config::Compression::None => svc,
            $crate::config::Compression::Gzip => svc.send_compressed(CompressionEncoding::Gzip),
            $crate::config::Compression::Deflate => {
                svc.send_compressed(CompressionEncoding::Deflate)
            }
            $crate::config::Compression::Zstd => svc.send_compressed(CompressionEncoding::Zstd),
        }
    }};
}

pub mod bes;
pub mod budget;
pub mod cli;
pub mod codec;
pub mod config;
pub mod conn;
pub mod devcerts;
#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod gate;
pub mod layers;
pub mod live;
pub mod metrics;
pub mod proto;
pub mod reapi;
pub mod server;
pub mod web;
