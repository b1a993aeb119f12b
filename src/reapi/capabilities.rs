//! `Capabilities.GetCapabilities`: what a local instance really supports.
//!
//! - digest function SHA256 only;
//! - `max_batch_total_size_bytes`: `limits.max-message-bytes` minus room for
//!   digests and framing ([`super::BATCH_OVERHEAD`]), which is what batch RPCs
//!   accept;
//! - compressors for `compressed-blobs` and batch updates: IDENTITY and ZSTD;
//! - action cache updates: the instance's `allow-updates`;
//! - absolute symlinks: ALLOWED (a cache stores what it is given);
//! - execution: disabled (local instances are caches);
//! - API versions 2.0 to 2.3. Bazel 2.1 speaks 2.0 and accepts a server whose
//!   range contains it.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Instances;
use crate::proto::build::bazel::remote::execution::v2 as re;
use crate::proto::build::bazel::semver::SemVer;

/// The Capabilities service of the local instances.
pub struct Capabilities {
    instances: Arc<Instances>,
}

impl Capabilities {
    /// The service over `instances`.
    pub fn new(instances: Arc<Instances>) -> Capabilities {
        Capabilities { instances }
    }
}

fn version(major: i32, minor: i32) -> Option<SemVer> {
    Some(SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    })
}

#[tonic::async_trait]
impl re::capabilities_server::Capabilities for Capabilities {
    async fn get_capabilities(
        &self,
        request: Request<re::GetCapabilitiesRequest>,
    ) -> Result<Response<re::ServerCapabilities>, Status> {
        let instance = self.instances.get(&request.get_ref().instance_name)?;
        let sha256 = re::digest_function::Value::Sha256 as i32;
        let compressors = vec![
            re::compressor::Value::Identity as i32,
            re::compressor::Value::Zstd as i32,
        ];
        Ok(Response::new(re::ServerCapabilities {
            cache_capabilities: Some(re::CacheCapabilities {
                digest_functions: vec![sha256],
                action_cache_update_capabilities: Some(re::ActionCacheUpdateCapabilities {
                    update_enabled: instance.allow_updates,
                }),
                cache_priority_capabilities: None,
                max_batch_total_size_bytes: i64::try_from(self.instances.max_batch_bytes)
                    .unwrap_or(i64::MAX),
                symlink_absolute_path_strategy: re::symlink_absolute_path_strategy::Value::Allowed
                    as i32,
                supported_compressors: compressors.clone(),
                supported_batch_update_compressors: compressors,
                max_cas_blob_size_bytes: i64::try_from(instance.store.max_bytes())
                    .unwrap_or(i64::MAX),
                split_blob_support: false,
                splice_blob_support: false,
                fast_cdc_2020_params: None,
                rep_max_cdc_params: None,
            }),
            execution_capabilities: Some(re::ExecutionCapabilities {
                digest_function: sha256,
                exec_enabled: false,
                execution_priority_capabilities: None,
                supported_node_properties: Vec::new(),
                digest_functions: vec![sha256],
            }),
            deprecated_api_version: None,
            low_api_version: version(2, 0),
            high_api_version: version(2, 3),
        }))
    }
}
