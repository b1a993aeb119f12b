//! `ActionCache`: GetActionResult and UpdateActionResult for the local
//! instances.
//!
//! As in BuildGrid's LRU action cache, a result is stored as a blob in the
//! instance's CAS (so it counts against the CAS budget) and the index maps the
//! action digest to the result's digest, keeping at most `max-entries`
//! entries. GetActionResult answers NOT_FOUND when there is no entry, when the
//! result blob was evicted, or when a blob the result references directly
//! (output files, stdout/stderr, output directory trees) is no longer in the
//! CAS, so a client never gets a hit it cannot download. The contents of
//! output directory trees are not walked (BuildGrid does; it costs a read of
//! every Tree).
//!
//! With `allow-updates: false`, UpdateActionResult is UNIMPLEMENTED "Updating
//! cache not allowed", exactly as BuildGrid 0.4.4 answers (its caches raise
//! `NotImplementedError`, which its error handler maps to UNIMPLEMENTED), and
//! Capabilities reports `update_enabled: false`. The index is in memory: a
//! restart empties it even with a disk CAS.

use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::digest::{check_function, BlobKey};
use super::{invalid, Instances};
use crate::proto::build::bazel::remote::execution::v2 as re;

/// Action digest -> result digest, bounded by entry count.
pub struct ActionCacheIndex {
    entries: moka::sync::Cache<BlobKey, BlobKey>,
}

impl ActionCacheIndex {
    /// An empty index holding at most `max_entries`.
    pub fn new(max_entries: u64) -> ActionCacheIndex {
        ActionCacheIndex {
            entries: moka::sync::Cache::new(max_entries),
        }
    }
}

/// The ActionCache service of the local instances.
pub struct ActionCache {
    instances: Arc<Instances>,
}

impl ActionCache {
    /// The service over `instances`.
    pub fn new(instances: Arc<Instances>) -> ActionCache {
        ActionCache { instances }
    }
}

/// The blobs a result references directly.
fn referenced(result: &re::ActionResult) -> Vec<BlobKey> {
    let mut keys = Vec::new();
    let mut add = |d: Option<&re::Digest>| {
        if let Ok(k) = BlobKey::from_digest(d) {
            keys.push(k);
        }
    };
    for f in &result.output_files {
        add(f.digest.as_ref());
    }
    for d in &result.output_directories {
        add(d.tree_digest.as_ref());
    }
    add(result.stdout_digest.as_ref());
    add(result.stderr_digest.as_ref());
    keys
}

#[tonic::async_trait]
impl re::action_cache_server::ActionCache for ActionCache {
    async fn get_action_result(
        &self,
        request: Request<re::GetActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        let req = request.into_inner();
        let instance = self.instances.get(&req.instance_name)?;
        check_function(req.digest_function).map_err(invalid)?;
        let action = BlobKey::from_digest(req.action_digest.as_ref()).map_err(invalid)?;
        let not_found = || Status::not_found(format!("no action result for {action}"));
        let result_key = instance
            .action_cache
            .entries
            .get(&action)
            .ok_or_else(not_found)?;
        let Some(data) = instance.store.get(&result_key).await? else {
            instance.action_cache.entries.invalidate(&action);
            return Err(not_found());
        };
        let result = re::ActionResult::decode(data)
            .map_err(|e| Status::internal(format!("stored action result is corrupt: {e}")))?;
        let refs = referenced(&result);
        if !instance.store.missing(&refs).await.is_empty() {
            instance.action_cache.entries.invalidate(&action);
            return Err(Status::not_found(format!(
                "action result for {action} references blobs no longer in the CAS"
            )));
        }
        Ok(Response::new(result))
    }

    async fn update_action_result(
        &self,
        request: Request<re::UpdateActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        let req = request.into_inner();
        let instance = self.instances.get(&req.instance_name)?;
        if !instance.allow_updates {
            return Err(Status::unimplemented("Updating cache not allowed"));
        }
        check_function(req.digest_function).map_err(invalid)?;
        let action = BlobKey::from_digest(req.action_digest.as_ref()).map_err(invalid)?;
        let result = req
            .action_result
            .ok_or_else(|| Status::invalid_argument("missing action_result"))?;
        let data = result.encode_to_vec();
        let key = BlobKey::of(&data);
        instance.store.put(key, &data).await?;
        instance.action_cache.entries.insert(action, key);
        Ok(Response::new(result))
    }
}
