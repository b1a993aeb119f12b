//! The generated protobuf messages, clients and servers of the APIs in `proto/`.
// Generated code: its items carry the .proto files' comments where they have
// any, and clippy's and rustdoc's rules are not ours to hold it to.
#![allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
    pub mod longrunning {
        tonic::include_proto!("google.longrunning");
    }
    pub mod bytestream {
        tonic::include_proto!("google.bytestream");
    }
    pub mod devtools {
        pub mod build {
            pub mod v1 {
                tonic::include_proto!("google.devtools.build.v1");
            }
        }
    }
}

pub mod build {
    pub mod bazel {
        pub mod semver {
            tonic::include_proto!("build.bazel.semver");
        }
        pub mod remote {
            pub mod execution {
                pub mod v2 {
                    tonic::include_proto!("build.bazel.remote.execution.v2");
                }
            }
        }
    }
    pub mod buildgrid {
        tonic::include_proto!("build.buildgrid");
    }
}

pub mod gridgate {
    pub mod v1 {
        tonic::include_proto!("gridgate.v1");
    }
}

/// Bazel's Build Event Protocol (`bazel_event` payloads) and what it imports.
pub mod build_event_stream {
    tonic::include_proto!("build_event_stream");
}
pub mod command_line {
    tonic::include_proto!("command_line");
}
pub mod failure_details {
    tonic::include_proto!("failure_details");
}
pub mod options {
    tonic::include_proto!("options");
}
pub mod blaze {
    tonic::include_proto!("blaze");
    pub mod invocation_policy {
        tonic::include_proto!("blaze.invocation_policy");
    }
}

/// The encoded `FileDescriptorSet` of every API in `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gridgate_descriptor.bin"));
