//! The one decision: may this identity call this RPC on this instance?
//!
//! [`Gate::decide`] is used by the Gate for every request, by services that
//! narrow their results to what the caller may see (through
//! [`super::Authorizer`]), by the web pages and by `gridgate policy explain`,
//! so all of them give the same answer for the same reason.
//!
//! The cascade, in order: `authorization: none` allows everything; without
//! an `acl-config` every authenticated caller is allowed (as in BuildGrid); a
//! query that names no instance is allowed and narrowed per result; else the
//! policy decides (an instance without an entry denies everything).

use std::sync::Arc;

use super::identity::{AuthMethod, Identity};
use super::policy::SharedStr;
use super::reload::LivePolicy;
use super::Authorizer;
use crate::config::AuthMethod as Method;

/// The answer of [`Gate::decide`].
#[derive(Debug, Clone)]
pub struct Verdict {
    /// Whether the call may go on.
    pub allowed: bool,
    /// Why, for the audit line and the PERMISSION_DENIED message.
    pub reason: SharedStr,
    /// The rule that decided, as `FILE#KEY.allow[N]`, when one did.
    pub rule: Option<SharedStr>,
    /// Set when the call is allowed only because a dry-run entry is not
    /// enforced: the reason it would have been denied.
    pub dry_run_denied: Option<String>,
    /// The reason label of `gridgate_gate_decisions_total`.
    pub label: &'static str,
}

/// The fixed reasons of decisions made without a policy, built once.
struct Reasons {
    authorization_none: SharedStr,
    no_acl: SharedStr,
    query_scope: SharedStr,
}

fn reasons() -> &'static Reasons {
    static REASONS: std::sync::OnceLock<Reasons> = std::sync::OnceLock::new();
    REASONS.get_or_init(|| Reasons {
        authorization_none: "authorization none: every call is allowed".into(),
        no_acl: "no ACL configured: authenticated callers are allowed".into(),
        query_scope: "query over every instance the caller may query".into(),
    })
}

impl Verdict {
    fn allow(reason: &SharedStr, label: &'static str) -> Verdict {
        Verdict {
            allowed: true,
            reason: reason.clone(),
            rule: None,
            dry_run_denied: None,
            label,
        }
    }
}

/// What the decision is made from: the authorization method and the live
/// policy. The Gate holds one, and hands it to services as their
/// [`Authorizer`].
#[derive(Clone)]
pub struct Decider {
    method: Method,
    policy: Option<Arc<LivePolicy>>,
}

impl Decider {
    /// Decides with `policy` (None: no `acl-config`) under `method`.
    pub fn new(method: Method, policy: Option<Arc<LivePolicy>>) -> Decider {
        Decider { method, policy }
    }

    /// The decision for `identity` calling `rpc` (the name ACLs use) on
    /// `instance`; `None` is a query over every instance, narrowed per result.
    pub fn decide(&self, instance: Option<&str>, rpc: &str, identity: &Identity) -> Verdict {
        if self.method == Method::None {
            return Verdict::allow(&reasons().authorization_none, "authorization_none");
        }
        let Some(live) = &self.policy else {
            return Verdict::allow(&reasons().no_acl, "no_acl");
        };
        let Some(instance) = instance else {
            return Verdict::allow(&reasons().query_scope, "query_scope");
        };
        let d = live.current().decide(instance, rpc, identity);
        let label = match (d.allowed, identity.method == AuthMethod::Anonymous) {
            (true, _) => "rule",
            (false, true) => "anonymous_no_rule",
            (false, false) => "no_rule",
        };
        Verdict {
            allowed: d.allowed,
            reason: d.reason,
            rule: d.rule,
            dry_run_denied: d.dry_run_denied,
            label,
        }
    }
}

impl Authorizer for Decider {
    fn allows(&self, identity: &Identity, instance: &str, rpc: &str) -> bool {
        self.decide(Some(instance), rpc, identity).allowed
    }
}
