//! Remote Execution API instance services behind the gate.
//!
//! [`ReapiServices`] holds the local instances of a config (an in-memory or
//! on-disk CAS and an action cache each) and adds the Capabilities,
//! ContentAddressableStorage, ByteStream and ActionCache gRPC services to the
//! gateway's routes. Every request names its instance; a name that is not a
//! local instance is INVALID_ARGUMENT "unknown instance" (upstream instances
//! are forwarded by [`upstream`] before they get here). The services never
//! authorize: the Gate admitted the request already.

pub mod action_cache;
pub mod bytestream;
pub mod capabilities;
pub mod cas;
pub mod compression;
pub mod digest;
pub mod resource;
pub mod store;
pub mod uploads;
pub mod upstream;

use std::collections::HashMap;
use std::sync::Arc;

use tonic::service::RoutesBuilder;

use crate::config::{CasConfig, Compression, InstanceBackend, InstanceConfig, LimitsConfig};
use crate::proto::build::bazel::remote::execution::v2 as re;
use crate::proto::google::bytestream as bs;
use store::{disk::DiskStore, memory::MemoryStore, BlobStore};

/// Room kept in a message for everything but blob data (digests, framing),
/// when sizing batches against `limits.max-message-bytes`.
pub const BATCH_OVERHEAD: usize = 64 * 1024;

/// One local instance: its CAS, action cache and partial uploads.
pub struct Instance {
    /// The instance name ("" is the unnamed instance).
    pub name: String,
    /// The blobs.
    pub store: Arc<dyn BlobStore>,
    /// The action cache (results are stored in `store`).
    pub action_cache: action_cache::ActionCacheIndex,
    /// Whether clients may write action results.
    pub allow_updates: bool,
    /// ByteStream uploads that may be resumed.
    pub uploads: uploads::Uploads,
}

/// The local instances by name, with the limits the services apply.
pub struct Instances {
    by_name: HashMap<String, Arc<Instance>>,
    /// Largest total of blob bytes in one batch request or response.
    pub max_batch_bytes: u64,
    /// Largest gRPC message decoded or encoded.
    pub max_message_bytes: usize,
}

impl Instances {
    /// The instance `name`, or INVALID_ARGUMENT naming it.
    pub fn get(&self, name: &str) -> Result<Arc<Instance>, tonic::Status> {
        self.by_name.get(name).cloned().ok_or_else(|| {
            let shown: String = name.chars().take(200).collect();
            tonic::Status::invalid_argument(format!("unknown instance {shown:?}"))
        })
    }

    /// The names of the local instances.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// Why the REAPI services could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ReapiError {
    #[error("instance {name:?}: {source}")]
    Disk {
        name: String,
        #[source]
        source: store::disk::OpenError,
    },
}

/// The REAPI services of a config's local instances.
#[derive(Clone)]
pub struct ReapiServices {
    instances: Arc<Instances>,
}

/// Applies the configured compression and message limits to a generated
/// tonic server (the same choices as the gateway's other services).
macro_rules! configured {
    ($svc:expr, $compression:expr, $max:expr) => {
        compressed!($svc, $compression)
            .max_decoding_message_size($max)
            .max_encoding_message_size($max)
    };
}

impl ReapiServices {
    /// Builds the stores of every local instance in `config` (opening and
    /// scanning disk stores); upstream instances are skipped.
    pub fn new(
        instances: &[InstanceConfig],
        limits: &LimitsConfig,
    ) -> Result<ReapiServices, ReapiError> {
        let max_message_bytes = limits.max_message_bytes;
        let overhead = BATCH_OVERHEAD.min(max_message_bytes / 2);
        let mut by_name = HashMap::new();
        for i in instances {
            let InstanceBackend::Local { cas, action_cache } = &i.backend else {
                continue;
            };
            let store: Arc<dyn BlobStore> = match cas {
                CasConfig::Memory { max_bytes } => Arc::new(MemoryStore::new(*max_bytes)),
                CasConfig::Disk { path, max_bytes } => {
                    Arc::new(DiskStore::open(path, *max_bytes).map_err(|source| {
                        ReapiError::Disk {
                            name: i.name.clone(),
                            source,
                        }
                    })?)
                }
            };
            let store: Arc<dyn BlobStore> = if crate::metrics::enabled() {
                Arc::new(store::measured::Measured::new(store, &i.name))
            } else {
                store
            };
            by_name.insert(
                i.name.clone(),
                Arc::new(Instance {
                    name: i.name.clone(),
                    store,
                    action_cache: action_cache::ActionCacheIndex::new(action_cache.max_entries),
                    allow_updates: action_cache.allow_updates,
                    uploads: uploads::Uploads::default(),
                }),
            );
        }
        Ok(ReapiServices {
            instances: Arc::new(Instances {
                by_name,
                max_batch_bytes: (max_message_bytes - overhead) as u64,
                max_message_bytes,
            }),
        })
    }

    /// The local instances.
    pub fn instances(&self) -> &Arc<Instances> {
        &self.instances
    }

    /// Adds Capabilities, ContentAddressableStorage, ByteStream and
    /// ActionCache to `routes`; returns their fully-qualified service names
    /// (for reflection).
    pub fn add_to(
        &self,
        routes: &mut RoutesBuilder,
        compression: Compression,
    ) -> Vec<&'static str> {
        let max = self.instances.max_message_bytes;
        let i = &self.instances;
        routes.add_service(configured!(
            re::capabilities_server::CapabilitiesServer::new(capabilities::Capabilities::new(
                i.clone()
            )),
            compression,
            max
        ));
        routes.add_service(configured!(
            re::content_addressable_storage_server::ContentAddressableStorageServer::new(
                cas::Cas::new(i.clone())
            ),
            compression,
            max
        ));
        routes.add_service(configured!(
            bs::byte_stream_server::ByteStreamServer::new(bytestream::ByteStream::new(i.clone())),
            compression,
            max
        ));
        routes.add_service(configured!(
            re::action_cache_server::ActionCacheServer::new(action_cache::ActionCache::new(
                i.clone()
            )),
            compression,
            max
        ));
        vec![
            "build.bazel.remote.execution.v2.Capabilities",
            "build.bazel.remote.execution.v2.ContentAddressableStorage",
            "google.bytestream.ByteStream",
            "build.bazel.remote.execution.v2.ActionCache",
        ]
    }
}

/// INVALID_ARGUMENT from anything displayable.
pub(crate) fn invalid(e: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::invalid_argument(e.to_string())
}
