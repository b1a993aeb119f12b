//! What the Gate hands to services: the admitted caller and a way to ask about
//! other instances.
//!
//! Services never decide whether a request may run (the Gate already did), but
//! some need more: BES `QueryEventStreams` returns only streams of instances the
//! caller may query. The Gate puts an [`Admission`] into the request extensions
//! of every admitted request.

use std::sync::Arc;

use super::identity::Identity;

/// Answers "may this identity call this RPC on this instance?" with the policy
/// the Gate enforces (current at the time of the call).
pub trait Authorizer: Send + Sync + 'static {
    /// Whether `identity` may call `rpc` (the bare RPC name) on `instance`.
    fn allows(&self, identity: &Identity, instance: &str, rpc: &str) -> bool;
}

/// An authorizer that allows everything (authorization `none`).
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn allows(&self, _: &Identity, _: &str, _: &str) -> bool {
        true
    }
}

/// The Gate's record of an admitted request, in its request extensions.
#[derive(Clone)]
pub struct Admission {
    /// Who is calling.
    pub identity: Arc<Identity>,
    /// The instance the request was admitted for (None for RPCs without one).
    pub instance: Option<String>,
    /// The RPC name ACLs use, e.g. `PublishBuildToolEventStream`.
    pub rpc: &'static str,
    /// The policy, to ask about other instances.
    pub authorizer: Arc<dyn Authorizer>,
}

impl Admission {
    /// Whether the caller may call `rpc` on `instance`.
    pub fn may(&self, instance: &str, rpc: &str) -> bool {
        self.authorizer.allows(&self.identity, instance, rpc)
    }

    /// An admission for tests and for servers without a gate in front.
    pub fn anonymous_allow_all(instance: Option<String>, rpc: &'static str) -> Admission {
        Admission {
            identity: Arc::new(Identity::anonymous(None)),
            instance,
            rpc,
            authorizer: Arc::new(AllowAll),
        }
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("identity", &self.identity)
            .field("instance", &self.instance)
            .field("rpc", &self.rpc)
            .finish_non_exhaustive()
    }
}
