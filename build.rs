//! Compiles the APIs in `proto/` with protox (a pure-Rust protobuf compiler,
//! so a fresh machine needs no system `protoc`) and generates prost messages and
//! tonic clients and servers. The encoded descriptor set is kept for server
//! reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "google/rpc/status.proto",
    "google/rpc/code.proto",
    "google/longrunning/operations.proto",
    "google/bytestream/bytestream.proto",
    "build/bazel/semver/semver.proto",
    "build/bazel/remote/execution/v2/remote_execution.proto",
    "google/devtools/build/v1/build_status.proto",
    "google/devtools/build/v1/build_events.proto",
    "google/devtools/build/v1/publish_build_event.proto",
    "build/buildgrid/query_build_events.proto",
    "gridgate/v1/build_events.proto",
    "gridgate/v1/invocations.proto",
    "build_event_stream/build_event_stream.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["proto"])?;
    {
        use prost::Message;
        std::fs::write(out.join("gridgate_descriptor.bin"), fds.encode_to_vec())?;
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".")
        // gridgate's prost codec (src/codec.rs): fewer per-byte buffer calls.
        .codec_path("crate::codec::ProstCodec")
        .compile_fds(fds)?;
    Ok(())
}
