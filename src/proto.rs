//! The generated protobuf messages, clients and servers of the APIs in `proto/`.
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

/// The encoded `FileDescriptorSet` of every API in `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gridgate_descriptor.bin"));
