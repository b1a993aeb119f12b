//! The ACL policy: which identities may call which RPCs on which instances.
//!
//! A [`Policy`] is loaded once from the `acl-config` file or directory, is immutable
//! afterwards (hot reload builds a new one and swaps it), and answers one question on
//! every request: [`Policy::decide`]`(instance, rpc, identity)`.
//!
//! ```no_run
//! # use std::path::Path;
//! # use gridgate::gate::{identity::Identity, policy::{Policy, PolicyOptions}};
//! let policy = Policy::load(Path::new("policies/"), &PolicyOptions::default())?;
//! let decision = policy.decide("team-a", "FindMissingBlobs", &Identity::anonymous(None));
//! if !decision.allowed {
//!     // PERMISSION_DENIED, with decision.reason ("no rule allows FindMissingBlobs on instance team-a")
//! }
//! # Ok::<(), gridgate::gate::policy::PolicyError>(())
//! ```
//!
//! # The file format: BuildGrid's, read from its source
//!
//! gridgate reads BuildGrid's ACL files unchanged. What BuildGrid 0.4.4 does, from
//! `buildgrid/server/auth/config.py` (`Acl.is_authorized`,
//! `InstanceAuthorizationConfig.is_authorized`, `parse_auth_config`) and
//! `buildgrid/server/auth/manager.py` (`_check_acls`):
//!
//! - The file is a YAML mapping of instance name to `{allow: all}` or
//!   `{allow: [rules]}`; `allow` is required. A rule has the optional keys `actor`,
//!   `subject`, `workflow` (regular expressions) and `requests` (a list of bare RPC
//!   method names: BuildGrid passes the servicer method's `__name__`, e.g.
//!   `FindMissingBlobs`, `Write`, `PublishBuildToolEventStream`).
//! - Patterns are applied with Python's `re.match`: anchored at the start only, so
//!   `prodbuilder` also admits `prodbuilder-evil`.
//! - A rule field that is set while the caller lacks that value is matched against the
//!   empty string (`re.match(self.actor, actor or "")`): `actor: ".*"` admits callers
//!   without an actor, e.g. on `allow-unauthenticated-instances`. (With the headers
//!   method a missing header even becomes the text `"None"`.)
//! - `requests` absent (`None`) means every request; `requests: []` means none.
//! - A rule with no keys at all (`{}`) matches everything.
//! - An instance name is looked up with `dict.get`, so `""` is a valid key (the default
//!   instance). An instance without an entry is denied once any ACL file is configured;
//!   without `acl-config` there is no check at all.
//! - Unknown keys are silently ignored (pydantic's default): a typo such as `requets`
//!   turns a rule into "every request", and gridgate's `deny`, `claims` and `cert` keys
//!   are ignored by BuildGrid, which makes such files broader there.
//! - A denial is reported as UNAUTHENTICATED.
//!
//! # What gridgate does differently (see `policies/README.md` for the user's view)
//!
//! - Patterns match the **whole** value (`^(?:pat)$`) unless [`MatchMode::Prefix`]
//!   (config `acl-match: prefix`) asks for BuildGrid's `re.match` behaviour.
//! - A condition on a value the caller does not have never matches (fail closed):
//!   `actor: ".*"` means "any caller that has an actor".
//! - Unknown keys (YAML merge keys `<<` included), rules without any condition (write
//!   `allow: all` / `deny: all` for that), empty or null patterns, an entry with neither
//!   `allow` nor `deny`, duplicate keys and files without entries are errors, with the
//!   file, line, key path and reason. Regexes use the `regex` crate's syntax (no
//!   look-around, no backreferences: such patterns fail to load rather than mismatch).
//! - Additive keys: `deny:` (same shape as `allow:`, including `deny: all`; a matching
//!   deny wins), `claims: {NAME: pattern}` and
//!   `cert: {subject|cn|dns|uri|email|ip: pattern}` conditions (any value of a
//!   multi-valued field may match), a rule `name:` used in reasons, instance-name globs
//!   (a key containing `*`: `*` matches within one `/` segment, `**` across segments,
//!   everything else is literal), `dry-run: true` per entry or per file (a top-level
//!   `gridgate: {dry-run: true}` block; an entry's own `dry-run` wins; `gridgate` is thus
//!   not usable as an instance name), and a directory of files whose entries add up.
//!
//! # How a decision is made
//!
//! Every entry whose key matches the instance takes part, from every file: the exact
//! key and every glob. Then, in this order:
//!
//! 1. a matching deny rule of an enforced entry denies;
//! 2. if an enforced entry with `allow:` matches the instance, the request is allowed
//!    when an allow rule of an enforced entry matches it and denied otherwise; a
//!    matching dry-run deny rule is reported in [`Decision::dry_run_denied`];
//! 3. otherwise, if a dry-run entry with `allow:` matches the instance (or every entry
//!    of the whole policy is dry-run), the request is allowed and what would have
//!    denied it is reported;
//! 4. otherwise it is denied: no entry grants anything on this instance.
//!
//! Dry-run entries thus never deny, and entries with only `deny:` rules never open an
//! instance.

mod check;
mod compile;
mod model;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::gate::identity::{claim_as_text, Identity};

pub use check::check;

use compile::{InstancePattern, Matcher};

/// How rule patterns are applied to identity values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatchMode {
    /// The pattern must match the whole value: `^(?:pat)$`. The default.
    #[default]
    Whole,
    /// BuildGrid's `re.match`: the pattern must match at the start, `^(?:pat)`, so
    /// `prodbuilder` also admits `prodbuilder-evil`. Only for compatibility.
    Prefix,
}

impl MatchMode {
    /// The configuration spelling (`whole`, `prefix`).
    pub fn as_str(self) -> &'static str {
        match self {
            MatchMode::Whole => "whole",
            MatchMode::Prefix => "prefix",
        }
    }
}

/// Options that change how a policy file is understood.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyOptions {
    /// Whole-value (default) or BuildGrid prefix matching of rule patterns.
    pub match_mode: MatchMode,
}

/// An immutable string shared by every decision that quotes it: a rule's
/// reason and locator are built once, when the policy loads, and each request
/// it decides takes a reference count rather than a copy.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SharedStr(std::sync::Arc<str>);

impl SharedStr {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> Self {
        SharedStr(s.into())
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> Self {
        SharedStr(s.into())
    }
}

impl PartialEq<&str> for SharedStr {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for SharedStr {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<str> for SharedStr {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl fmt::Display for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// The outcome of [`Policy::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may go on.
    pub allowed: bool,
    /// Why, for logs and the PERMISSION_DENIED message, e.g.
    /// `allowed by team-a.yaml: team-a allow[0]` or `no rule allows Write on instance team-a`.
    pub reason: SharedStr,
    /// The rule that decided, as `FILE#KEY.allow[N]`, when one did.
    pub rule: Option<SharedStr>,
    /// Set when the request is allowed only because a dry-run entry is not enforced:
    /// the reason it would have been denied.
    pub dry_run_denied: Option<String>,
}

/// A finding of [`check`] that does not stop the policy from loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// `FILE:LINE: KEY.PATH` (the line when it could be found).
    pub location: String,
    /// What is worth a second look, and usually what to write instead.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file or directory could not be read.
    #[error("{}: cannot read: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A policy directory holds no `*.yaml` / `*.yml` file.
    #[error("{}: no policy files (*.yaml, *.yml) in this directory", .path.display())]
    EmptyDirectory {
        /// The directory.
        path: PathBuf,
    },
    /// A file is not a valid policy: `FILE:LINE: KEY.PATH: REASON`.
    #[error("{}", invalid_message(.file, *.line, .path, .reason))]
    Invalid {
        /// The file as it was named (the `origin` of [`Policy::from_yaml`]).
        file: String,
        /// The 1-based line, when known.
        line: Option<usize>,
        /// The key path of the bad value, e.g. `team-a.allow[1].actor`; empty for the
        /// whole document.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid_message(file: &str, line: Option<usize>, path: &str, reason: &str) -> String {
    let mut out = String::from(file);
    if let Some(line) = line {
        out.push_str(&format!(":{line}"));
    }
    if !path.is_empty() {
        out.push_str(": ");
        out.push_str(path);
    }
    out.push_str(": ");
    out.push_str(reason);
    out
}

/// A loaded, compiled ACL policy. Immutable; `Send + Sync`; cheap to share in an `Arc`.
pub struct Policy {
    entries: Vec<Entry>,
    /// Exact instance name -> indices (into `entries`, ascending) of every entry that
    /// applies to it: its exact entries and the glob entries that match it.
    exact: HashMap<Box<str>, Box<[u32]>>,
    /// Glob entries, in load order, for instance names that are not an exact key.
    patterns: Vec<(InstancePattern, u32)>,
    /// Whether some entry is dry-run (skips the dry-run pass when not).
    any_dry_run: bool,
    /// Whether every entry is dry-run: then the policy enforces nothing.
    all_dry_run: bool,
    version: String,
    files: Vec<PathBuf>,
}

/// One `instance: {allow, deny}` entry of one file, compiled.
struct Entry {
    key: String,
    dry_run: bool,
    allow: Rules,
    deny: Rules,
}

/// The `allow:` or `deny:` of an entry.
enum Rules {
    /// The key is absent.
    Absent,
    /// `all`: matches every request.
    All(Verdict),
    /// A list of rules; any one matching is enough.
    List(Vec<Rule>),
}

/// The precomputed texts reported when a rule decides.
struct Verdict {
    /// `allowed by team-a.yaml: team-a allow[0]`.
    reason: SharedStr,
    /// `policies/team-a.yaml#team-a.allow[0]`.
    locator: SharedStr,
}

/// One compiled rule: every condition must hold.
struct Rule {
    /// `None`: every RPC.
    requests: Option<Box<[Box<str>]>>,
    conditions: Box<[Condition]>,
    verdict: Verdict,
}

/// One `field: pattern` condition of a rule.
struct Condition {
    field: Field,
    matcher: Matcher,
}

/// Which identity value a condition reads. The meaning of each is that of
/// [`Identity::field_values`] (`actor`, `claim:NAME`, `cert:dns`, ...); they are read
/// here without copying (a test holds the two to the same answers).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Actor,
    Subject,
    Workflow,
    Claim(Box<str>),
    Cert(CertField),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CertField {
    Subject,
    CommonName,
    Dns,
    Uri,
    Email,
    Ip,
}

impl Field {
    /// The field named as [`Identity::field_values`] names it.
    fn parse(name: &str) -> Option<Field> {
        Some(match name {
            "actor" => Field::Actor,
            "subject" => Field::Subject,
            "workflow" => Field::Workflow,
            _ => {
                if let Some(claim) = name.strip_prefix("claim:") {
                    return Some(Field::Claim(claim.into()));
                }
                Field::Cert(match name.strip_prefix("cert:")? {
                    "subject" => CertField::Subject,
                    "cn" => CertField::CommonName,
                    "dns" => CertField::Dns,
                    "uri" => CertField::Uri,
                    "email" => CertField::Email,
                    "ip" => CertField::Ip,
                    _ => return None,
                })
            }
        })
    }

    /// Whether any of the caller's values of this field satisfies `test`. A caller
    /// without the value has none, so the answer is then `false`.
    fn any(&self, identity: &Identity, test: &mut dyn FnMut(&str) -> bool) -> bool {
        fn one(value: &Option<String>, test: &mut dyn FnMut(&str) -> bool) -> bool {
            value.as_deref().is_some_and(test)
        }
        match self {
            Field::Actor => one(&identity.actor, test),
            Field::Subject => one(&identity.subject, test),
            Field::Workflow => one(&identity.workflow, test),
            Field::Claim(name) => match identity.claims.get(&**name) {
                Some(Value::String(text)) => test(text),
                Some(Value::Bool(flag)) => test(if *flag { "true" } else { "false" }),
                number @ Some(Value::Number(_)) => {
                    claim_as_text(number).is_some_and(|text| test(&text))
                }
                _ => false,
            },
            Field::Cert(part) => {
                let Some(cert) = identity.certificate.as_deref() else {
                    return false;
                };
                match part {
                    CertField::Subject => test(&cert.subject),
                    CertField::CommonName => one(&cert.common_name, test),
                    CertField::Dns => cert.dns_names.iter().any(|v| test(v)),
                    CertField::Uri => cert.uris.iter().any(|v| test(v)),
                    CertField::Email => cert.emails.iter().any(|v| test(v)),
                    CertField::Ip => cert.ips.iter().any(|v| test(v)),
                }
            }
        }
    }
}

impl Rules {
    fn is_present(&self) -> bool {
        !matches!(self, Rules::Absent)
    }

    /// The first rule matching the request, if any.
    fn first_match(&self, rpc: &str, identity: &Identity) -> Option<&Verdict> {
        match self {
            Rules::Absent => None,
            Rules::All(verdict) => Some(verdict),
            Rules::List(rules) => rules
                .iter()
                .find(|rule| rule.matches(rpc, identity))
                .map(|rule| &rule.verdict),
        }
    }
}

impl Rule {
    fn matches(&self, rpc: &str, identity: &Identity) -> bool {
        if let Some(requests) = &self.requests {
            if !requests.iter().any(|name| &**name == rpc) {
                return false;
            }
        }
        self.conditions.iter().all(|c| c.matches(identity))
    }
}

impl Condition {
    fn matches(&self, identity: &Identity) -> bool {
        self.field
            .any(identity, &mut |value| self.matcher.is_match(value))
    }
}

/// Up to this many entries per instance are gathered without allocating.
const INLINE_MATCHES: usize = 16;

impl Policy {
    /// Loads `path`: one policy file, or a directory whose `*.yaml` / `*.yml` files
    /// (sorted by name, not recursive, hidden files skipped) each hold one team's entries.
    pub fn load(path: &Path, opts: &PolicyOptions) -> Result<Policy, PolicyError> {
        let sources = model::read_sources(path)?;
        Ok(model::build(&sources, opts)?.0)
    }

    /// Builds a policy from the text of one file; `origin` names it in messages.
    /// [`Policy::files`] is empty for such a policy.
    pub fn from_yaml(
        source: &str,
        origin: &str,
        opts: &PolicyOptions,
    ) -> Result<Policy, PolicyError> {
        let sources = [model::Source::text(origin, source)];
        Ok(model::build(&sources, opts)?.0)
    }

    /// Whether `identity` may call `rpc` (a bare method name such as `Write`) on `instance`.
    pub fn decide(&self, instance: &str, rpc: &str, identity: &Identity) -> Decision {
        let mut inline = [0u32; INLINE_MATCHES];
        let mut spilled = Vec::new();
        let matched: &[u32] = match self.exact.get(instance) {
            Some(indices) => indices,
            None => {
                let mut n = 0;
                for (pattern, index) in &self.patterns {
                    if pattern.is_match(instance) {
                        if n < INLINE_MATCHES {
                            inline[n] = *index;
                        } else {
                            if spilled.is_empty() {
                                spilled.extend_from_slice(&inline);
                            }
                            spilled.push(*index);
                        }
                        n += 1;
                    }
                }
                if spilled.is_empty() {
                    &inline[..n]
                } else {
                    &spilled
                }
            }
        };
        self.decide_among(matched, instance, rpc, identity)
    }

    fn decide_among(
        &self,
        matched: &[u32],
        instance: &str,
        rpc: &str,
        identity: &Identity,
    ) -> Decision {
        let entries = || matched.iter().map(|&i| &self.entries[i as usize]);

        // 1. Enforced denials win over everything.
        for entry in entries().filter(|e| !e.dry_run) {
            if let Some(verdict) = entry.deny.first_match(rpc, identity) {
                return Decision::decided(false, verdict);
            }
        }

        // 2. An instance with an enforced allow list is decided by enforced rules only.
        let mut enforced_grant = false;
        let mut dry_grant = false;
        let mut enforced_allow = None;
        for entry in entries() {
            if !entry.allow.is_present() {
                continue;
            }
            if entry.dry_run {
                dry_grant = true;
            } else {
                enforced_grant = true;
                if let Some(verdict) = entry.allow.first_match(rpc, identity) {
                    enforced_allow = Some(verdict);
                    break;
                }
            }
        }
        let dry_deny = || {
            if !self.any_dry_run {
                return None;
            }
            entries()
                .filter(|e| e.dry_run)
                .find_map(|e| e.deny.first_match(rpc, identity))
        };
        if let Some(verdict) = enforced_allow {
            let mut decision = Decision::decided(true, verdict);
            decision.dry_run_denied = dry_deny().map(|v| v.reason.to_string());
            return decision;
        }
        if enforced_grant {
            return Decision::denied(no_rule_allows(rpc, instance));
        }

        // 3. Only dry-run entries grant anything here: not enforced, but reported.
        if dry_grant || (self.all_dry_run && !self.entries.is_empty()) {
            let dry_allow = entries()
                .filter(|e| e.dry_run)
                .find_map(|e| e.allow.first_match(rpc, identity));
            let would_deny = match (dry_deny(), dry_allow) {
                (Some(deny), _) => Some(deny.reason.to_string()),
                (None, Some(_)) => None,
                (None, None) if matched.is_empty() => Some(no_entry(instance)),
                (None, None) => Some(no_rule_allows(rpc, instance)),
            };
            return match (dry_allow, would_deny) {
                (Some(verdict), None) => Decision::decided(true, verdict),
                (allow, would_deny) => Decision {
                    allowed: true,
                    reason: format!(
                        "allowed: dry-run, not enforced on instance {}",
                        show_instance(instance)
                    )
                    .into(),
                    rule: allow.map(|v| v.locator.clone()),
                    dry_run_denied: would_deny,
                },
            };
        }

        // 4. Nothing grants anything on this instance.
        if matched.is_empty() {
            Decision::denied(no_entry(instance))
        } else {
            Decision::denied(no_rule_allows(rpc, instance))
        }
    }

    /// A short, stable fingerprint of the loaded files (16 hex digits of FNV-1a 64
    /// over each file's name and bytes), for logs, metrics and `check-config`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The files the policy was loaded from, in load order (empty for [`Policy::from_yaml`]).
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The instance keys (exact names and globs) of every file, sorted, each once.
    pub fn instances(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.entries.iter().map(|e| e.key.clone()).collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("version", &self.version)
            .field("files", &self.files)
            .field("entries", &self.entries.len())
            .field("dry_run", &self.any_dry_run)
            .finish()
    }
}

impl Decision {
    fn decided(allowed: bool, verdict: &Verdict) -> Decision {
        Decision {
            allowed,
            reason: verdict.reason.clone(),
            rule: Some(verdict.locator.clone()),
            dry_run_denied: None,
        }
    }

    fn denied(reason: String) -> Decision {
        Decision {
            allowed: false,
            reason: reason.into(),
            rule: None,
            dry_run_denied: None,
        }
    }
}

fn no_rule_allows(rpc: &str, instance: &str) -> String {
    format!(
        "no rule allows {rpc} on instance {}",
        show_instance(instance)
    )
}

fn no_entry(instance: &str) -> String {
    format!("no policy entry for instance {}", show_instance(instance))
}

/// An instance name as shown in reasons: as it is, or `""` for the empty name.
pub(crate) fn show_instance(instance: &str) -> Cow<'_, str> {
    if instance.is_empty() {
        Cow::Borrowed("\"\"")
    } else {
        Cow::Borrowed(instance)
    }
}

/// A key as shown in key paths and locators: quoted when it is empty or could be
/// mistaken for path syntax.
fn show_key(key: &str) -> Cow<'_, str> {
    let plain = !key.is_empty()
        && !key
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '[' | ']' | '"' | '#' | ':'));
    if plain {
        Cow::Borrowed(key)
    } else {
        Cow::Owned(format!("{key:?}"))
    }
}
