use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::compile::{has_bare_dot, literal, same_in_both_modes, Fnv1a, InstancePattern, Matcher};
use super::model::Source;
use super::*;
use crate::gate::identity::{AuthMethod, PeerCertificate};

const ORIGIN: &str = "policies/test.yaml";

/// The RPC names BuildGrid 0.4.4 authorizes (servicer method names).
const KNOWN: &[&str] = &[
    "BatchReadBlobs",
    "BatchUpdateBlobs",
    "FindMissingBlobs",
    "GetTree",
    "GetCapabilities",
    "GetActionResult",
    "UpdateActionResult",
    "Execute",
    "WaitExecution",
    "Read",
    "Write",
    "QueryWriteStatus",
    "PublishBuildToolEventStream",
    "PublishLifecycleEvent",
    "QueryEventStreams",
];

fn whole() -> PolicyOptions {
    PolicyOptions::default()
}

fn prefix() -> PolicyOptions {
    PolicyOptions {
        match_mode: MatchMode::Prefix,
    }
}

fn policy(yaml: &str) -> Policy {
    policy_with(yaml, &whole())
}

fn policy_with(yaml: &str, opts: &PolicyOptions) -> Policy {
    match Policy::from_yaml(yaml, ORIGIN, opts) {
        Ok(p) => p,
        Err(e) => panic!("policy should load: {e}"),
    }
}

fn error(yaml: &str) -> String {
    match Policy::from_yaml(yaml, ORIGIN, &whole()) {
        Ok(_) => panic!("policy should not load:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

fn warnings(yaml: &str, opts: &PolicyOptions) -> Vec<String> {
    let sources = [Source::text(ORIGIN, yaml)];
    match check::check_sources(&sources, opts, KNOWN) {
        Ok(w) => w.iter().map(|w| w.to_string()).collect(),
        Err(e) => panic!("check should pass: {e}"),
    }
}

fn anon() -> Identity {
    Identity::anonymous(None)
}

fn who(actor: &str) -> Identity {
    Identity {
        method: AuthMethod::Jwt,
        actor: Some(actor.into()),
        subject: Some(actor.into()),
        workflow: None,
        claims: Arc::new(Map::new()),
        certificate: None,
    }
}

fn fields(actor: Option<&str>, subject: Option<&str>, workflow: Option<&str>) -> Identity {
    Identity {
        method: AuthMethod::Headers,
        actor: actor.map(Into::into),
        subject: subject.map(Into::into),
        workflow: workflow.map(Into::into),
        claims: Arc::new(Map::new()),
        certificate: None,
    }
}

fn jwt(claims: Value) -> Identity {
    let Value::Object(claims) = claims else {
        panic!("claims must be an object")
    };
    let text = |name: &str| claims.get(name).and_then(Value::as_str).map(String::from);
    Identity {
        method: AuthMethod::Jwt,
        actor: text("act").or_else(|| text("sub")),
        subject: text("sub"),
        workflow: text("aud"),
        claims: Arc::new(claims),
        certificate: None,
    }
}

fn with_cert(cert: PeerCertificate) -> Identity {
    let mut id = Identity::anonymous(Some(Arc::new(cert)));
    id.method = AuthMethod::Certificate;
    id
}

fn allowed(p: &Policy, instance: &str, rpc: &str, id: &Identity) -> bool {
    p.decide(instance, rpc, id).allowed
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "gridgate-policy-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, text).expect("write");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------
// BuildGrid files.

#[test]
fn allow_all_admits_every_caller_and_request() {
    let p = policy("dev:\n  allow: all\n");
    for rpc in ["FindMissingBlobs", "Write", "Anything"] {
        let d = p.decide("dev", rpc, &anon());
        assert!(d.allowed);
        assert_eq!(d.reason, "allowed by test.yaml: dev allow: all");
        assert_eq!(d.rule.as_deref(), Some("policies/test.yaml#dev.allow"));
        assert_eq!(d.dry_run_denied, None);
    }
}

#[test]
fn buildgrid_rules_with_regexes_and_requests() {
    let p = policy(
        r#"
team-b:
  allow:
    - actor: "ci-[a-z]+"
      requests: [FindMissingBlobs, BatchUpdateBlobs, Write, UpdateActionResult]
    - subject: "user:.*"
      requests: [FindMissingBlobs, Read, GetActionResult]
"#,
    );
    let ci = who("ci-linux");
    assert!(allowed(&p, "team-b", "Write", &ci));
    assert!(allowed(&p, "team-b", "FindMissingBlobs", &ci));
    assert!(!allowed(&p, "team-b", "Read", &ci));
    let human = fields(Some("alice"), Some("user:alice"), None);
    assert!(allowed(&p, "team-b", "Read", &human));
    let d = p.decide("team-b", "Write", &human);
    assert!(!d.allowed);
    assert_eq!(d.reason, "no rule allows Write on instance team-b");
    assert_eq!(d.rule, None);
    assert!(!allowed(&p, "team-b", "Write", &who("ci-Linux")));
}

#[test]
fn first_matching_rule_is_reported() {
    let p = policy("team-a:\n  allow:\n    - actor: nobody\n    - actor: bob\n    - actor: b.b\n");
    let d = p.decide("team-a", "Read", &who("bob"));
    assert!(d.allowed);
    assert_eq!(d.reason, "allowed by test.yaml: team-a allow[1]");
    assert_eq!(
        d.rule.as_deref(),
        Some("policies/test.yaml#team-a.allow[1]")
    );
}

#[test]
fn rule_name_appears_in_the_reason() {
    let p = policy("team-a:\n  allow:\n    - name: ci writers\n      actor: bob\n");
    assert_eq!(
        p.decide("team-a", "Read", &who("bob")).reason,
        "allowed by test.yaml: team-a allow[0] (ci writers)"
    );
}

#[test]
fn rule_with_only_requests_admits_anonymous_callers() {
    let p = policy("public:\n  allow:\n    - requests: [FindMissingBlobs, Read]\n");
    assert!(allowed(&p, "public", "Read", &anon()));
    assert!(allowed(&p, "public", "FindMissingBlobs", &who("x")));
    assert!(!allowed(&p, "public", "Write", &anon()));
}

#[test]
fn absent_requests_means_every_request() {
    let p = policy("a:\n  allow:\n    - actor: bob\n");
    for rpc in KNOWN {
        assert!(allowed(&p, "a", rpc, &who("bob")));
    }
}

#[test]
fn empty_requests_matches_no_request() {
    let p = policy("a:\n  allow:\n    - actor: bob\n      requests: []\n");
    assert!(!allowed(&p, "a", "Read", &who("bob")));
}

#[test]
fn request_names_are_exact() {
    let p = policy("a:\n  allow:\n    - requests: [Write]\n");
    assert!(!allowed(&p, "a", "write", &anon()));
    assert!(!allowed(&p, "a", "WriteX", &anon()));
    assert!(!allowed(&p, "a", "Writ", &anon()));
}

#[test]
fn instance_without_entry_is_denied() {
    let p = policy("dev:\n  allow: all\n");
    let d = p.decide("prod", "Read", &who("root"));
    assert_eq!(
        d,
        Decision {
            allowed: false,
            reason: "no policy entry for instance prod".into(),
            rule: None,
            dry_run_denied: None,
        }
    );
    assert!(!p.decide("", "Read", &who("root")).allowed);
    assert_eq!(
        p.decide("", "Read", &who("root")).reason,
        "no policy entry for instance \"\""
    );
}

#[test]
fn empty_instance_name_is_a_valid_key() {
    let p = policy("\"\":\n  allow:\n    - requests: [GetCapabilities]\n");
    assert!(allowed(&p, "", "GetCapabilities", &anon()));
    assert!(!allowed(&p, "x", "GetCapabilities", &anon()));
    assert_eq!(
        p.decide("", "Read", &anon()).reason,
        "no rule allows Read on instance \"\""
    );
    assert_eq!(
        p.decide("", "GetCapabilities", &anon()).rule.as_deref(),
        Some("policies/test.yaml#\"\".allow[0]")
    );
}

#[test]
fn every_condition_of_a_rule_must_hold() {
    let p = policy(
        "a:\n  allow:\n    - actor: bob\n      subject: repo:x\n      workflow: build\n      requests: [Read]\n",
    );
    assert!(allowed(
        &p,
        "a",
        "Read",
        &fields(Some("bob"), Some("repo:x"), Some("build"))
    ));
    assert!(!allowed(
        &p,
        "a",
        "Read",
        &fields(Some("bob"), Some("repo:y"), Some("build"))
    ));
    assert!(!allowed(
        &p,
        "a",
        "Read",
        &fields(Some("bob"), Some("repo:x"), None)
    ));
    assert!(!allowed(
        &p,
        "a",
        "Write",
        &fields(Some("bob"), Some("repo:x"), Some("build"))
    ));
}

#[test]
fn numeric_and_boolean_scalars_are_read_as_text() {
    // YAML `123:` and `actor: 42` are read as the text written, like a quoted string.
    let p = policy("123:\n  allow:\n    - actor: 42\n");
    assert!(allowed(&p, "123", "Read", &who("42")));
}

// ---------------------------------------------------------------------------------
// Whole-value and prefix matching.

#[test]
fn prodbuilder_whole_vs_prefix() {
    let yaml = "prod:\n  allow:\n    - actor: prodbuilder\n";
    let w = policy_with(yaml, &whole());
    let p = policy_with(yaml, &prefix());
    assert!(allowed(&w, "prod", "Write", &who("prodbuilder")));
    assert!(!allowed(&w, "prod", "Write", &who("prodbuilder-evil")));
    assert!(!allowed(&w, "prod", "Write", &who("evil-prodbuilder")));
    assert!(allowed(&p, "prod", "Write", &who("prodbuilder")));
    assert!(allowed(&p, "prod", "Write", &who("prodbuilder-evil")));
    assert!(!allowed(&p, "prod", "Write", &who("evil-prodbuilder")));
}

#[test]
fn regex_prodbuilder_whole_vs_prefix() {
    let yaml = "prod:\n  allow:\n    - actor: \"prod(builder|deployer)\"\n";
    let w = policy_with(yaml, &whole());
    let p = policy_with(yaml, &prefix());
    assert!(allowed(&w, "prod", "Write", &who("proddeployer")));
    assert!(!allowed(&w, "prod", "Write", &who("proddeployer-evil")));
    assert!(allowed(&p, "prod", "Write", &who("proddeployer-evil")));
}

#[test]
fn anchored_pattern_means_the_same_in_both_modes() {
    let yaml = "prod:\n  allow:\n    - actor: prodbuilder$\n";
    for opts in [whole(), prefix()] {
        let p = policy_with(yaml, &opts);
        assert!(allowed(&p, "prod", "Write", &who("prodbuilder")));
        assert!(!allowed(&p, "prod", "Write", &who("prodbuilder-evil")));
    }
}

#[test]
fn alternation_is_grouped_before_anchoring() {
    // `^a|b$` would admit "ax" and "xb"; gridgate compiles `^(?:a|b)$`.
    let p = policy("i:\n  allow:\n    - actor: a|b\n");
    assert!(allowed(&p, "i", "Read", &who("a")));
    assert!(allowed(&p, "i", "Read", &who("b")));
    assert!(!allowed(&p, "i", "Read", &who("ax")));
    assert!(!allowed(&p, "i", "Read", &who("xb")));
    let p = policy_with("i:\n  allow:\n    - actor: a|b\n", &prefix());
    assert!(allowed(&p, "i", "Read", &who("ax")));
    assert!(!allowed(&p, "i", "Read", &who("xb")));
}

#[test]
fn explicit_anchors_are_harmless() {
    let p = policy("i:\n  allow:\n    - actor: ^ci-bot$\n");
    assert!(allowed(&p, "i", "Read", &who("ci-bot")));
    assert!(!allowed(&p, "i", "Read", &who("ci-bot2")));
}

#[test]
fn matching_is_case_sensitive_unless_asked() {
    let p = policy("i:\n  allow:\n    - actor: ci-bot\n    - subject: (?i)admin\n");
    assert!(!allowed(
        &p,
        "i",
        "Read",
        &fields(Some("CI-BOT"), None, None)
    ));
    assert!(allowed(&p, "i", "Read", &fields(None, Some("ADMIN"), None)));
}

#[test]
fn verbose_patterns_with_comments_work() {
    let yaml = "i:\n  allow:\n    - actor: \"(?x) ci - [a-z]+   # the CI bots\"\n";
    for opts in [whole(), prefix()] {
        let p = policy_with(yaml, &opts);
        assert!(allowed(&p, "i", "Read", &who("ci-linux")));
        assert!(!allowed(&p, "i", "Read", &who("ci-")));
    }
    let p = policy(yaml);
    assert!(!allowed(&p, "i", "Read", &who("ci-linux-evil")));
}

#[test]
fn literal_patterns_take_the_fast_path() {
    assert_eq!(literal("prodbuilder"), Some(("prodbuilder".into(), false)));
    assert_eq!(
        literal("team-a/ci@example"),
        Some(("team-a/ci@example".into(), false))
    );
    assert_eq!(literal("^prodbuilder$"), Some(("prodbuilder".into(), true)));
    assert_eq!(
        literal("ci\\.example\\.com$"),
        Some(("ci.example.com".into(), true))
    );
    assert_eq!(literal("cost\\$"), Some(("cost$".into(), false)));
    assert_eq!(literal("a\\\\$"), Some(("a\\".into(), true)));
    for regex in [
        "a.b", "a|b", "(?i)a", "a\\d", "a$b", "^^a", "a\\z", "a*", "a\\",
    ] {
        assert_eq!(literal(regex), None, "{regex}");
    }
    let kind = |p: &str, mode| match Matcher::new(p, mode) {
        Ok(Matcher::Equals(t)) => format!("= {t}"),
        Ok(Matcher::StartsWith(t)) => format!("^ {t}"),
        Ok(Matcher::Regex(_)) => "regex".into(),
        Err(e) => e,
    };
    assert_eq!(kind("ci-bot", MatchMode::Whole), "= ci-bot");
    assert_eq!(kind("ci-bot", MatchMode::Prefix), "^ ci-bot");
    assert_eq!(kind("ci-bot$", MatchMode::Prefix), "= ci-bot");
    assert_eq!(kind("^ci\\-bot$", MatchMode::Whole), "= ci-bot");
    assert_eq!(kind("ci-.*", MatchMode::Whole), "regex");
}

#[test]
fn literal_and_regex_matching_agree() {
    let patterns = [
        "ci-bot",
        "^ci-bot$",
        "ci\\.bot$",
        "ci\\-bot",
        "^ci-bot",
        "a\\\\$",
        "cost\\$",
        "^$x",
    ];
    let values = [
        "ci-bot", "ci-bot2", "ci.bot", "ciXbot", "xci-bot", "a\\", "cost$", "cost$x", "",
    ];
    for mode in [MatchMode::Whole, MatchMode::Prefix] {
        for p in patterns {
            let fast = Matcher::new(p, mode).expect("pattern");
            let close = if mode == MatchMode::Whole { ")$" } else { ")" };
            let slow = regex::Regex::new(&format!("^(?:{p}{close}")).expect("regex");
            for v in values {
                assert_eq!(fast.is_match(v), slow.is_match(v), "{mode:?} {p} {v}");
            }
        }
    }
}

#[test]
fn field_access_agrees_with_identity_field_values() {
    let mut id = jwt(json!({
        "sub": "repo:o/r", "act": "bot", "aud": "gw",
        "s": "text", "t": true, "f": false, "n": 42, "x": -1.5, "big": 18446744073709551615u64,
        "o": {"a": 1}, "l": ["a"], "z": null, "": "empty name",
    }));
    let names = [
        "actor",
        "subject",
        "workflow",
        "claim:s",
        "claim:t",
        "claim:f",
        "claim:n",
        "claim:x",
        "claim:big",
        "claim:o",
        "claim:l",
        "claim:z",
        "claim:",
        "claim:missing",
        "cert:subject",
        "cert:cn",
        "cert:dns",
        "cert:uri",
        "cert:email",
        "cert:ip",
    ];
    let check = |id: &Identity| {
        for name in names {
            let field = Field::parse(name).expect(name);
            let mut ours = Vec::new();
            field.any(id, &mut |v| {
                ours.push(v.to_string());
                false
            });
            assert_eq!(ours, id.field_values(name), "{name}");
        }
    };
    check(&id);
    check(&anon());
    id.certificate = Some(Arc::new(cert()));
    check(&id);
    id.certificate = Some(Arc::new(PeerCertificate::default()));
    check(&id);
    assert_eq!(Field::parse("cert:serial"), None);
    assert_eq!(Field::parse("nonsense"), None);
}

#[test]
fn hostile_patterns_are_refused_not_compiled() {
    let e = error("i:\n  allow:\n    - actor: \"(\\\\w{100}){100}\"\n");
    assert!(
        e.starts_with("policies/test.yaml:3: i.allow[0].actor: regex `"),
        "{e}"
    );
    assert!(e.contains("is too large"), "{e}");
    // Unicode classes of ordinary size are fine.
    policy("i:\n  allow:\n    - actor: \"[\\\\w.-]{1,64}@example\\\\.com\"\n");
}

// ---------------------------------------------------------------------------------
// Missing values.

#[test]
fn a_condition_on_a_missing_value_never_matches() {
    let p = policy("i:\n  allow:\n    - actor: \".*\"\n");
    assert!(!allowed(&p, "i", "Read", &anon()));
    assert!(!allowed(
        &p,
        "i",
        "Read",
        &fields(None, Some("s"), Some("w"))
    ));
    // A present but empty value is a value.
    assert!(allowed(&p, "i", "Read", &fields(Some(""), None, None)));
    assert!(allowed(&p, "i", "Read", &who("anyone")));
}

#[test]
fn a_missing_claim_or_certificate_never_matches() {
    let p =
        policy("i:\n  allow:\n    - claims: {repository: \".*\"}\n    - cert: {subject: \".*\"}\n");
    assert!(!allowed(&p, "i", "Read", &anon()));
    assert!(!allowed(
        &p,
        "i",
        "Read",
        &fields(Some("a"), Some("b"), Some("c"))
    ));
    assert!(!allowed(
        &p,
        "i",
        "Read",
        &jwt(json!({"sub": "x", "repo": "y"}))
    ));
    assert!(allowed(
        &p,
        "i",
        "Read",
        &jwt(json!({"sub": "x", "repository": "y"}))
    ));
    assert!(allowed(
        &p,
        "i",
        "Read",
        &with_cert(PeerCertificate::default())
    ));
}

// ---------------------------------------------------------------------------------
// Deny rules.

#[test]
fn deny_wins_over_allow_all() {
    let p = policy(
        "team-a:\n  allow: all\n  deny:\n    - actor: mallory\n    - requests: [Write]\n      claims: {event_name: pull_request}\n",
    );
    assert!(allowed(&p, "team-a", "Write", &who("bob")));
    let d = p.decide("team-a", "Write", &who("mallory"));
    assert!(!d.allowed);
    assert_eq!(d.reason, "denied by test.yaml: team-a deny[0]");
    assert_eq!(d.rule.as_deref(), Some("policies/test.yaml#team-a.deny[0]"));
    let pr = jwt(json!({"sub": "repo:o/r:pull_request", "event_name": "pull_request"}));
    assert!(!allowed(&p, "team-a", "Write", &pr));
    assert_eq!(
        p.decide("team-a", "Write", &pr).reason,
        "denied by test.yaml: team-a deny[1]"
    );
    assert!(allowed(&p, "team-a", "Read", &pr));
}

#[test]
fn deny_wins_over_a_matching_allow_rule() {
    let p = policy(
        "i:\n  allow:\n    - actor: bob\n  deny:\n    - actor: b.*\n      requests: [Write]\n",
    );
    assert!(allowed(&p, "i", "Read", &who("bob")));
    assert!(!allowed(&p, "i", "Write", &who("bob")));
}

#[test]
fn deny_only_entry_combines_with_other_entries() {
    let p = policy("i:\n  allow: all\n\"**\":\n  deny:\n    - actor: mallory\n");
    assert!(allowed(&p, "i", "Read", &who("bob")));
    assert!(!allowed(&p, "i", "Read", &who("mallory")));
    // A deny-only entry grants nothing by itself.
    let d = p.decide("other", "Read", &who("bob"));
    assert!(!d.allowed);
    assert_eq!(d.reason, "no rule allows Read on instance other");
}

#[test]
fn deny_all_locks_an_instance() {
    let p = policy("i:\n  allow: all\n  deny: all\n");
    let d = p.decide("i", "Read", &who("bob"));
    assert!(!d.allowed);
    assert_eq!(d.reason, "denied by test.yaml: i deny: all");
    assert_eq!(d.rule.as_deref(), Some("policies/test.yaml#i.deny"));
}

// ---------------------------------------------------------------------------------
// Claims and certificates.

#[test]
fn claims_match_strings_booleans_and_numbers() {
    let p = policy(
        r#"
team-a:
  allow:
    - claims:
        repository: org/team-a
        ref_protected: true
        repository_id: 1234
      requests: [Write]
"#,
    );
    let ci = |protected: Value, id: Value| {
        jwt(json!({"sub": "repo:org/team-a", "repository": "org/team-a",
                   "ref_protected": protected, "repository_id": id}))
    };
    assert!(allowed(
        &p,
        "team-a",
        "Write",
        &ci(json!(true), json!(1234))
    ));
    assert!(allowed(
        &p,
        "team-a",
        "Write",
        &ci(json!("true"), json!("1234"))
    ));
    assert!(!allowed(
        &p,
        "team-a",
        "Write",
        &ci(json!(false), json!(1234))
    ));
    assert!(!allowed(
        &p,
        "team-a",
        "Write",
        &ci(json!(true), json!(12345))
    ));
    let other =
        jwt(json!({"repository": "org/team-b", "ref_protected": true, "repository_id": 1234}));
    assert!(!allowed(&p, "team-a", "Write", &other));
}

#[test]
fn object_and_array_claims_match_nothing() {
    let p = policy("i:\n  allow:\n    - claims: {act: \".*\"}\n");
    assert!(!allowed(
        &p,
        "i",
        "Read",
        &jwt(json!({"act": {"sub": "x"}}))
    ));
    assert!(!allowed(&p, "i", "Read", &jwt(json!({"act": ["x"]}))));
    assert!(allowed(&p, "i", "Read", &jwt(json!({"act": "x"}))));
}

#[test]
fn claim_patterns_are_regexes_with_the_match_mode() {
    let yaml = "i:\n  allow:\n    - claims: {job_workflow_ref: \"org/ci/.github/workflows/build.yml@refs/heads/main\"}\n";
    let w = policy_with(yaml, &whole());
    let good =
        jwt(json!({"job_workflow_ref": "org/ci/.github/workflows/build.yml@refs/heads/main"}));
    let longer =
        jwt(json!({"job_workflow_ref": "org/ci/.github/workflows/build.yml@refs/heads/main-x"}));
    assert!(allowed(&w, "i", "Read", &good));
    assert!(!allowed(&w, "i", "Read", &longer));
    let p = policy_with(yaml, &prefix());
    assert!(allowed(&p, "i", "Read", &longer));
}

fn cert() -> PeerCertificate {
    PeerCertificate {
        subject: "CN=ci-bot,O=Example".into(),
        common_name: Some("ci-bot".into()),
        dns_names: vec![
            "ci-1.build.example.com".into(),
            "ci.build.example.com".into(),
        ],
        uris: vec!["spiffe://example.com/ci/bot".into()],
        emails: vec!["ci@example.com".into()],
        ips: vec!["10.0.0.7".into(), "fd00::7".into()],
    }
}

#[test]
fn certificate_fields_match_and_any_san_suffices() {
    let p = policy(
        r#"
by-dns:
  allow:
    - cert: {dns: 'ci\.build\.example\.com'}
by-cn:
  allow:
    - cert: {cn: ci-bot, subject: 'CN=ci-bot,O=Example'}
by-uri:
  allow:
    - cert: {uri: 'spiffe://example\.com/ci/.*'}
by-email:
  allow:
    - cert: {email: 'ci@example\.com'}
by-ip:
  allow:
    - cert: {ip: 'fd00::7'}
"#,
    );
    let id = with_cert(cert());
    for instance in ["by-dns", "by-cn", "by-uri", "by-email", "by-ip"] {
        assert!(allowed(&p, instance, "Read", &id), "{instance}");
        assert!(!allowed(&p, instance, "Read", &anon()), "{instance}");
    }
    let mut other = cert();
    other.dns_names = vec!["ci.build.example.com.evil.org".into()];
    other.common_name = None;
    let other = with_cert(other);
    assert!(!allowed(&p, "by-dns", "Read", &other));
    assert!(!allowed(&p, "by-cn", "Read", &other));
}

#[test]
fn conditions_across_kinds_combine_with_and() {
    let p = policy(
        "i:\n  allow:\n    - actor: ci-bot\n      cert: {uri: 'spiffe://example\\.com/.*'}\n      claims: {env: prod}\n",
    );
    let mut id = jwt(json!({"sub": "ci-bot", "env": "prod"}));
    assert!(!allowed(&p, "i", "Read", &id));
    id.certificate = Some(Arc::new(cert()));
    assert!(allowed(&p, "i", "Read", &id));
    let mut staging = jwt(json!({"sub": "ci-bot", "env": "staging"}));
    staging.certificate = Some(Arc::new(cert()));
    assert!(!allowed(&p, "i", "Read", &staging));
}

// ---------------------------------------------------------------------------------
// Instance patterns.

#[test]
fn single_star_stays_within_one_segment() {
    let p = policy("\"team-a/*\":\n  allow: all\n");
    assert!(allowed(&p, "team-a/x", "Read", &anon()));
    assert!(allowed(&p, "team-a/", "Read", &anon()));
    assert!(!allowed(&p, "team-a", "Read", &anon()));
    assert!(!allowed(&p, "team-a/x/y", "Read", &anon()));
    assert!(!allowed(&p, "team-ab/x", "Read", &anon()));
}

#[test]
fn double_star_crosses_segments() {
    let p = policy("team-a/**:\n  allow: all\n");
    assert!(allowed(&p, "team-a/x", "Read", &anon()));
    assert!(allowed(&p, "team-a/x/y/z", "Read", &anon()));
    assert!(!allowed(&p, "team-a", "Read", &anon()));
    assert!(!allowed(&p, "team-b/x", "Read", &anon()));
    let all = policy("\"**\":\n  allow: all\n");
    assert!(allowed(&all, "", "Read", &anon()));
    assert!(allowed(&all, "a/b/c", "Read", &anon()));
}

#[test]
fn glob_characters_other_than_star_are_literal() {
    let p = policy("\"team.a/*-(ci)\":\n  allow: all\n");
    assert!(allowed(&p, "team.a/x-(ci)", "Read", &anon()));
    assert!(!allowed(&p, "teamXa/x-(ci)", "Read", &anon()));
    assert!(!allowed(&p, "team.a/x-ci", "Read", &anon()));
    let g = InstancePattern::new("a*b**c").expect("glob");
    assert!(g.is_match("abc"));
    assert!(g.is_match("axxb/y/zc"));
    assert!(!g.is_match("a/b/c"));
}

#[test]
fn rules_of_every_matching_entry_combine() {
    let p = policy(
        r#"
"team-a/**":
  allow:
    - requests: [FindMissingBlobs, Read]
team-a/secret:
  allow:
    - actor: alice
  deny:
    - requests: [Read]
      actor: bob
"team-a/*":
  deny:
    - actor: mallory
"#,
    );
    // The glob's read-only rule applies to the exact instance too.
    assert!(allowed(&p, "team-a/secret", "FindMissingBlobs", &anon()));
    assert!(allowed(&p, "team-a/secret", "Write", &who("alice")));
    assert!(!allowed(&p, "team-a/secret", "Write", &who("bob")));
    let d = p.decide("team-a/secret", "Read", &who("bob"));
    assert_eq!(d.reason, "denied by test.yaml: team-a/secret deny[0]");
    assert!(!allowed(&p, "team-a/secret", "Read", &who("mallory")));
    assert!(!allowed(&p, "team-a/other", "Read", &who("mallory")));
    assert!(allowed(&p, "team-a/x/y", "Read", &who("mallory")));
    assert!(allowed(&p, "team-a/other", "Read", &who("bob")));
    // Load order decides which rule is reported: the glob's rule comes first here.
    assert_eq!(
        p.decide("team-a/secret", "FindMissingBlobs", &who("alice"))
            .reason,
        "allowed by test.yaml: team-a/** allow[0]"
    );
}

#[test]
fn many_matching_globs_spill_past_the_inline_buffer() {
    let mut yaml = String::new();
    for i in 1..=(INLINE_MATCHES + 5) {
        yaml.push_str(&format!(
            "\"{}\":\n  allow:\n    - actor: u{i}\n",
            "*".repeat(i)
        ));
    }
    let p = policy(&yaml);
    let last = INLINE_MATCHES + 5;
    assert!(allowed(&p, "x", "Read", &who(&format!("u{last}"))));
    assert!(allowed(&p, "x", "Read", &who("u1")));
    assert!(!allowed(&p, "x", "Read", &who("u0")));
    let d = p.decide("x", "Read", &who(&format!("u{last}")));
    assert_eq!(
        d.reason,
        format!("allowed by test.yaml: {} allow[0]", "*".repeat(last))
    );
}

// ---------------------------------------------------------------------------------
// Dry-run.

#[test]
fn dry_run_entry_reports_instead_of_denying() {
    let p =
        policy("enforced:\n  allow: all\ntrial:\n  dry-run: true\n  allow:\n    - actor: bob\n");
    let d = p.decide("trial", "Write", &who("eve"));
    assert!(d.allowed);
    assert_eq!(d.reason, "allowed: dry-run, not enforced on instance trial");
    assert_eq!(
        d.dry_run_denied.as_deref(),
        Some("no rule allows Write on instance trial")
    );
    let d = p.decide("trial", "Write", &who("bob"));
    assert!(d.allowed);
    assert_eq!(d.reason, "allowed by test.yaml: trial allow[0] [dry-run]");
    assert_eq!(d.dry_run_denied, None);
    // Instances without any entry are still denied.
    assert!(!allowed(&p, "other", "Read", &who("bob")));
}

#[test]
fn dry_run_deny_rule_is_reported_next_to_an_enforced_allow() {
    let p = policy(
        r#"
team-a:
  allow: all
"**":
  dry-run: true
  deny:
    - claims: {event_name: pull_request}
      requests: [Write]
"#,
    );
    let pr = jwt(json!({"sub": "x", "event_name": "pull_request"}));
    let d = p.decide("team-a", "Write", &pr);
    assert!(d.allowed);
    assert_eq!(d.reason, "allowed by test.yaml: team-a allow: all");
    assert_eq!(
        d.dry_run_denied.as_deref(),
        Some("denied by test.yaml: ** deny[0] [dry-run]")
    );
    assert_eq!(p.decide("team-a", "Read", &pr).dry_run_denied, None);
    // A dry-run entry with only deny rules opens nothing.
    assert!(!allowed(&p, "unlisted", "Read", &pr));
}

#[test]
fn dry_run_entries_never_override_an_enforced_allow_list() {
    let p = policy(
        "i:\n  allow:\n    - actor: alice\ni/**:\n  dry-run: true\n  allow: all\n\"*\":\n  dry-run: true\n  allow:\n    - actor: bob\n",
    );
    let d = p.decide("i", "Read", &who("bob"));
    assert!(!d.allowed);
    assert_eq!(d.reason, "no rule allows Read on instance i");
    assert!(allowed(&p, "i", "Read", &who("alice")));
}

#[test]
fn enforced_deny_applies_to_dry_run_instances() {
    let p = policy(
        "\"**\":\n  deny:\n    - actor: mallory\ntrial:\n  dry-run: true\n  allow:\n    - actor: bob\n",
    );
    assert!(!allowed(&p, "trial", "Read", &who("mallory")));
    let d = p.decide("trial", "Read", &who("eve"));
    assert!(d.allowed);
    assert!(d.dry_run_denied.is_some());
}

#[test]
fn dry_run_deny_beats_dry_run_allow_in_the_report() {
    let p = policy(
        "x:\n  allow: all\ntrial:\n  dry-run: true\n  allow: all\n  deny:\n    - actor: eve\n",
    );
    let d = p.decide("trial", "Read", &who("eve"));
    assert!(d.allowed);
    assert_eq!(d.rule.as_deref(), Some("policies/test.yaml#trial.allow"));
    assert_eq!(
        d.dry_run_denied.as_deref(),
        Some("denied by test.yaml: trial deny[0] [dry-run]")
    );
}

#[test]
fn file_level_dry_run_and_entry_override() {
    let p = policy(
        "gridgate:\n  dry-run: true\ntrial:\n  allow:\n    - actor: bob\nstrict:\n  dry-run: false\n  allow:\n    - actor: bob\n",
    );
    let d = p.decide("trial", "Read", &who("eve"));
    assert!(d.allowed);
    assert!(d.dry_run_denied.is_some());
    assert!(!allowed(&p, "strict", "Read", &who("eve")));
    assert!(!p.instances().contains(&"gridgate".to_string()));
}

#[test]
fn a_policy_that_is_all_dry_run_enforces_nothing() {
    let p = policy("gridgate:\n  dry-run: true\nteam-a:\n  allow:\n    - actor: bob\n");
    let d = p.decide("unlisted", "Write", &who("eve"));
    assert!(d.allowed);
    assert_eq!(
        d.dry_run_denied.as_deref(),
        Some("no policy entry for instance unlisted")
    );
    assert_eq!(d.rule, None); // An instance with only deny rules (dry-run too) has an entry but no allow.
    let p = policy("gridgate:\n  dry-run: true\n\"*\":\n  deny:\n    - actor: eve$\n");
    let d = p.decide("x", "Read", &who("bob"));
    assert!(d.allowed);
    assert_eq!(
        d.dry_run_denied.as_deref(),
        Some("no rule allows Read on instance x")
    );
    let d = p.decide("x", "Read", &who("eve"));
    assert!(d.allowed);
    assert_eq!(
        d.dry_run_denied.as_deref(),
        Some("denied by test.yaml: * deny[0] [dry-run]")
    );
}

// ---------------------------------------------------------------------------------
// Loading files and directories.

const TEAM_A: &str = "team-a:\n  allow:\n    - actor: alice\nshared:\n  allow:\n    - actor: alice\n      requests: [Read]\n";
const TEAM_B: &str =
    "team-b:\n  allow: all\nshared:\n  allow:\n    - actor: bob\n  deny:\n    - actor: eve\n";

#[test]
fn a_directory_merges_its_files_in_name_order() {
    let dir = TempDir::new();
    dir.write("b-team.yml", TEAM_B);
    dir.write("a-team.yaml", TEAM_A);
    dir.write("README.md", "not a policy: {");
    dir.write(".hidden.yaml", "broken: [");
    dir.write("notes.yaml.bak", "broken: [");
    fs::create_dir(dir.0.join("sub.yaml")).expect("subdir");
    let p = Policy::load(&dir.0, &whole()).expect("load");
    let names: Vec<_> = p
        .files()
        .iter()
        .map(|f| f.file_name().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["a-team.yaml", "b-team.yml"]);
    assert_eq!(p.instances(), ["shared", "team-a", "team-b"]);
    assert!(allowed(&p, "shared", "Read", &who("alice")));
    assert!(!allowed(&p, "shared", "Write", &who("alice")));
    assert!(allowed(&p, "shared", "Write", &who("bob")));
    assert!(!allowed(&p, "shared", "Read", &who("eve")));
    let d = p.decide("shared", "Read", &who("alice"));
    assert_eq!(d.reason, "allowed by a-team.yaml: shared allow[0]");
    let expected = format!("{}#shared.allow[0]", dir.0.join("a-team.yaml").display());
    assert_eq!(d.rule.as_deref(), Some(expected.as_str()));
    assert_eq!(
        p.decide("shared", "Read", &who("eve")).reason,
        "denied by b-team.yml: shared deny[0]"
    );
}

#[test]
fn a_single_file_loads_like_from_yaml() {
    let dir = TempDir::new();
    let file = dir.write("team-a.yaml", TEAM_A);
    let loaded = Policy::load(&file, &whole()).expect("load");
    assert_eq!(loaded.files(), std::slice::from_ref(&file));
    let inline = Policy::from_yaml(TEAM_A, "team-a.yaml", &whole()).expect("from_yaml");
    assert!(inline.files().is_empty());
    assert_eq!(loaded.version(), inline.version());
    for (instance, rpc, id) in [
        ("team-a", "Write", who("alice")),
        ("team-a", "Write", who("bob")),
        ("shared", "Read", who("alice")),
        ("shared", "Write", who("alice")),
    ] {
        assert_eq!(
            loaded.decide(instance, rpc, &id).allowed,
            inline.decide(instance, rpc, &id).allowed
        );
    }
}

#[test]
fn a_device_is_not_a_policy_file() {
    // Found by fuzzing the config: `acl-config: /dev/zero` was read until memory ran out.
    for path in ["/dev/zero", "/dev/null"] {
        let e = Policy::load(Path::new(path), &whole()).expect_err(path);
        assert!(matches!(e, PolicyError::Io { .. }), "{e}");
    }
}

#[test]
fn an_empty_directory_is_an_error() {
    let dir = TempDir::new();
    let e = Policy::load(&dir.0, &whole()).expect_err("empty dir");
    assert!(matches!(e, PolicyError::EmptyDirectory { .. }));
    assert_eq!(
        e.to_string(),
        format!(
            "{}: no policy files (*.yaml, *.yml) in this directory",
            dir.0.display()
        )
    );
    dir.write("notes.txt", "x");
    assert!(matches!(
        Policy::load(&dir.0, &whole()),
        Err(PolicyError::EmptyDirectory { .. })
    ));
    assert!(matches!(
        check(&dir.0, &whole(), KNOWN),
        Err(PolicyError::EmptyDirectory { .. })
    ));
}

#[test]
fn a_missing_path_is_an_io_error() {
    let e =
        Policy::load(Path::new("/nonexistent/gridgate/policies"), &whole()).expect_err("missing");
    assert!(matches!(e, PolicyError::Io { .. }));
    assert!(
        e.to_string()
            .starts_with("/nonexistent/gridgate/policies: cannot read: "),
        "{e}"
    );
}

#[test]
fn an_error_names_the_file_it_is_in() {
    let dir = TempDir::new();
    dir.write("a.yaml", TEAM_A);
    dir.write(
        "b.yaml",
        "team-b:\n  allow:\n    - actor: ok\n    - actr: typo\n",
    );
    let e = Policy::load(&dir.0, &whole()).expect_err("typo");
    let file = dir.0.join("b.yaml");
    assert!(
        e.to_string().starts_with(&format!(
            "{}:4: team-b.allow[1].actr: unknown field `actr`",
            file.display()
        )),
        "{e}"
    );
}

#[test]
fn version_is_a_stable_fingerprint() {
    let a = policy(TEAM_A);
    assert_eq!(a.version().len(), 16);
    assert!(a.version().chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(a.version(), policy(TEAM_A).version());
    assert_ne!(a.version(), policy(TEAM_B).version());
    assert_ne!(
        a.version(),
        policy(&format!("{TEAM_A}# comment\n")).version()
    );
    assert_ne!(
        a.version(),
        Policy::from_yaml(TEAM_A, "other.yaml", &whole())
            .expect("load")
            .version()
    );
    // FNV-1a 64 test vectors: the fingerprint never depends on the Rust version.
    let fnv = |bytes: &[u8]| {
        let mut h = Fnv1a::new();
        h.write(bytes);
        h.finish()
    };
    assert_eq!(fnv(b""), 0xcbf29ce484222325);
    assert_eq!(fnv(b"a"), 0xaf63dc4c8601ec8c);
    assert_eq!(fnv(b"foobar"), 0x85944171f73967e8);
}

#[test]
fn instances_lists_every_key_once() {
    let p = policy("b:\n  allow: all\na/*:\n  allow: all\n\"\":\n  allow: all\n");
    assert_eq!(p.instances(), ["", "a/*", "b"]);
}

#[test]
fn policy_is_send_sync_and_debug() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Policy>();
    shareable::<PolicyError>();
    let text = format!("{:?}", policy(TEAM_A));
    assert!(text.starts_with("Policy { version: "), "{text}");
}

#[test]
fn match_mode_reads_from_config() {
    let mode: MatchMode = serde_json::from_value(json!("prefix")).expect("prefix");
    assert_eq!(mode, MatchMode::Prefix);
    let mode: MatchMode = serde_json::from_value(json!("whole")).expect("whole");
    assert_eq!(mode, MatchMode::Whole);
    assert!(serde_json::from_value::<MatchMode>(json!("Prefix")).is_err());
    assert_eq!(MatchMode::Prefix.as_str(), "prefix");
}

// ---------------------------------------------------------------------------------
// Errors: file, line, key path, reason.

#[test]
fn bad_regex_error() {
    let e = error("team-a:\n  allow:\n    - actor: ok\n    - actor: \"ci-(bot\"\n");
    assert_eq!(
        e,
        "policies/test.yaml:4: team-a.allow[1].actor: invalid regex `ci-(bot`: unclosed group"
    );
    let e = error("team-a:\n  deny:\n    - claims:\n        repo: \"(?<=x)y\"\n");
    assert!(
        e.starts_with(
            "policies/test.yaml:4: team-a.deny[0].claims.repo: invalid regex `(?<=x)y`: "
        ),
        "{e}"
    );
}

#[test]
fn unknown_key_error() {
    let e = error("team-a:\n  allow:\n    - actor: ok\n    - actor: bob\n      requets: [Write]\n");
    assert!(
        e.starts_with("policies/test.yaml:5: team-a.allow[1].requets: unknown field `requets`, expected one of"),
        "{e}"
    );
    let e = error("team-a:\n  alow: all\n");
    assert!(
        e.starts_with("policies/test.yaml:2: team-a.alow: unknown field `alow`"),
        "{e}"
    );
    let e = error("i:\n  allow:\n    - cert: {dnss: x}\n");
    assert!(
        e.starts_with("policies/test.yaml:3: i.allow[0].cert.dnss: unknown field `dnss`"),
        "{e}"
    );
    let e = error("gridgate:\n  dryrun: true\ni:\n  allow: all\n");
    assert!(
        e.starts_with("policies/test.yaml:2: gridgate.dryrun: unknown field `dryrun`"),
        "{e}"
    );
}

#[test]
fn yaml_merge_keys_are_refused_not_ignored() {
    let e = error("i:\n  allow:\n    - <<: {actor: x}\n      requests: [Read]\n");
    assert!(e.contains("unknown field `<<`"), "{e}");
}

#[test]
fn wrong_type_error() {
    let e = error("team-a:\n  allow:\n    - actor: bob\n      requests: Write\n");
    assert_eq!(
        e,
        "policies/test.yaml:4: team-a.allow[0].requests: invalid type: string \"Write\", expected a sequence"
    );
    let e = error("team-a:\n  allow: some\n");
    assert_eq!(
        e,
        "policies/test.yaml:2: team-a.allow: invalid value: string \"some\", expected `all` or a list of rules"
    );
    let e = error("i:\n  allow:\n    - actor: [a, b]\n");
    assert!(
        e.starts_with("policies/test.yaml:3: i.allow[0].actor: invalid type: sequence"),
        "{e}"
    );
    let e = error("i:\n  allow: all\n  dry-run: maybe\n");
    assert!(
        e.starts_with("policies/test.yaml:3: i.dry-run: invalid type"),
        "{e}"
    );
    let e = error("- i\n");
    assert_eq!(
        e,
        "policies/test.yaml:1: invalid type: sequence, expected a mapping of instance names to policy entries"
    );
}

#[test]
fn entry_without_rules_is_an_error() {
    for yaml in ["team-a:\n", "team-a: {}\n", "team-a:\n  dry-run: true\n"] {
        let e = error(yaml);
        assert!(
            e.starts_with("policies/test.yaml:1: team-a: entry has neither `allow` nor `deny`"),
            "{e}"
        );
    }
    let e = error("team-a:\n  allow:\n");
    assert!(
        e.starts_with("policies/test.yaml:2: team-a.allow: invalid type"),
        "{e}"
    );
}

#[test]
fn empty_rules_are_errors() {
    let e = error("i:\n  allow:\n    - {}\n");
    assert!(
        e.starts_with("policies/test.yaml:3: i.allow[0]: rule has no conditions"),
        "{e}"
    );
    let e = error("i:\n  allow:\n    -\n    - actor: x\n");
    assert!(
        e.starts_with("policies/test.yaml:3: i.allow[0]: rule has no conditions"),
        "{e}"
    );
    let e = error("i:\n  deny:\n    - name: only a name\n");
    assert!(e.contains("rule has no conditions"), "{e}");
}

#[test]
fn empty_and_null_patterns_are_errors() {
    for value in ["", "~", "null", "\"\""] {
        let e = error(&format!("i:\n  allow:\n    - actor: {value}\n"));
        assert_eq!(
            e,
            "policies/test.yaml:3: i.allow[0].actor: empty pattern: remove the key to accept any value, or write `.*`",
            "{value}"
        );
    }
    let e = error("i:\n  allow:\n    - claims:\n        ref:\n");
    assert!(e.contains("i.allow[0].claims.ref: empty pattern"), "{e}");
}

#[test]
fn duplicate_keys_are_errors() {
    let e = error("team-a:\n  allow: all\nteam-b:\n  allow: all\nteam-a:\n  deny: all\n");
    assert_eq!(
        e,
        "policies/test.yaml:6: team-a: duplicate entry for instance `team-a` in this file"
    );
    let e = error("i:\n  allow:\n    - claims:\n        a: x\n        a: y\n");
    assert_eq!(
        e,
        "policies/test.yaml:5: i.allow[0].claims.a: duplicate key `a`"
    );
    let e = error("i:\n  allow:\n    - actor: x\n      actor: y\n");
    assert!(e.contains("duplicate field `actor`"), "{e}");
}

#[test]
fn empty_files_are_errors() {
    for yaml in [
        "",
        "# nothing yet\n",
        "gridgate:\n  dry-run: true\n",
        "{}\n",
    ] {
        let e = error(yaml);
        assert!(
            e.starts_with("policies/test.yaml: no instance entries"),
            "{yaml:?}: {e}"
        );
    }
}

#[test]
fn yaml_syntax_errors_have_a_line() {
    let e = error("team-a:\n  allow: [\n");
    assert!(e.starts_with("policies/test.yaml:3: team-a.allow: "), "{e}");
    let e = error("team-a:\n  allow: all\n bad indent: x\n");
    assert!(e.starts_with("policies/test.yaml:3"), "{e}");
}

#[test]
fn odd_keys_are_quoted_in_paths() {
    let e = error("\"\":\n  allow:\n    - actor: \"(\"\n");
    assert!(
        e.starts_with("policies/test.yaml:3: \"\".allow[0].actor: invalid regex"),
        "{e}"
    );
    let e = error("a.b:\n  allow:\n    - actor: \"(\"\n");
    assert!(
        e.starts_with("policies/test.yaml:3: \"a.b\".allow[0].actor"),
        "{e}"
    );
}

#[test]
fn errors_keep_their_parts() {
    let Err(PolicyError::Invalid {
        file,
        line,
        path,
        reason,
    }) = Policy::from_yaml("i:\n  allow:\n    - actor: \"(\"\n", "x.yaml", &whole())
    else {
        panic!("expected an Invalid error")
    };
    assert_eq!(file, "x.yaml");
    assert_eq!(line, Some(3));
    assert_eq!(path, "i.allow[0].actor");
    assert_eq!(reason, "invalid regex `(`: unclosed group");
}

// ---------------------------------------------------------------------------------
// check() warnings.

#[test]
fn check_warns_about_patterns_that_depend_on_the_match_mode() {
    let yaml = "prod:\n  allow:\n    - actor: prodbuilder\n    - actor: prodbuilder$\n    - subject: \"repo:org/.*\"\n    - workflow: a|b$\n    - claims: {repository: org/repo}\n";
    let w = warnings(yaml, &prefix());
    assert_eq!(w.len(), 3, "{w:#?}");
    assert!(
        w[2].starts_with(
            "policies/test.yaml:7: prod.allow[4].claims.repository: acl-match is prefix"
        ),
        "{}",
        w[2]
    );
    assert!(w[0].starts_with("policies/test.yaml:3: prod.allow[0].actor: acl-match is prefix: `prodbuilder` also matches"), "{}", w[0]);
    assert!(
        w[1].starts_with("policies/test.yaml:6: prod.allow[3].workflow: "),
        "{}",
        w[1]
    );
    let w = warnings(yaml, &whole());
    assert_eq!(w.len(), 2, "{w:#?}");
    assert!(
        w[0].contains("matches whole values here, but only the start of a value in BuildGrid"),
        "{}",
        w[0]
    );
}

#[test]
fn same_in_both_modes_heuristic() {
    for same in ["a$", "a\\z", "a.*", "a.+", "a.*?", "(a|b)$", "^x$", "a[|]$"] {
        assert!(same_in_both_modes(same), "{same}");
    }
    for differs in ["a", "a|b$", "a\\$", "[a$]", "a\\.*", "a[.]*", "a*", "(a$)"] {
        assert!(!same_in_both_modes(differs), "{differs}");
    }
}

#[test]
fn check_warns_about_unknown_rpcs_with_a_hint() {
    let yaml = "i:\n  allow:\n    - requests:\n        - Write\n        - FindMissingBlob\n        - findmissingblobs\n";
    let w = warnings(yaml, &whole());
    assert_eq!(w.len(), 2, "{w:#?}");
    assert_eq!(
        w[0],
        "policies/test.yaml:5: i.allow[0].requests[1]: unknown RPC `FindMissingBlob`: the gateway routes no RPC of that name"
    );
    assert!(
        w[1].ends_with("(did you mean `FindMissingBlobs`?)"),
        "{}",
        w[1]
    );
    // Without a list of known RPCs nothing is reported.
    let sources = [Source::text(ORIGIN, yaml)];
    assert!(check::check_sources(&sources, &whole(), &[])
        .expect("check")
        .is_empty());
}

#[test]
fn check_warns_about_lists_that_match_nothing() {
    let w = warnings(
        "i:\n  allow: []\nj:\n  allow:\n    - actor: x$\n      requests: []\n",
        &whole(),
    );
    assert_eq!(w.len(), 2, "{w:#?}");
    assert!(
        w[0].starts_with("policies/test.yaml:2: i.allow: `allow: []` allows nothing"),
        "{}",
        w[0]
    );
    assert!(
        w[1].starts_with("policies/test.yaml:6: j.allow[0].requests: empty `requests`"),
        "{}",
        w[1]
    );
    let w = warnings("i:\n  allow: all\n  deny: all\n", &whole());
    assert_eq!(w, ["policies/test.yaml:3: i.deny: `deny: all` denies every request to `i`, whatever any entry allows"]);
}

#[test]
fn check_is_quiet_about_allow_all_with_deny_rules() {
    let w = warnings(
        "i:\n  allow: all\n  deny:\n    - actor: mallory$\n",
        &whole(),
    );
    assert!(w.is_empty(), "{w:#?}");
}

#[test]
fn check_warns_about_dry_run() {
    let w = warnings(
        "gridgate:\n  dry-run: true\ntrial:\n  allow: all\nenforced:\n  dry-run: false\n  allow: all\n",
        &whole(),
    );
    assert_eq!(w.len(), 1, "{w:#?}");
    assert!(
        w[0].starts_with("policies/test.yaml:2: gridgate.dry-run: the whole file is dry-run"),
        "{}",
        w[0]
    );
    let w = warnings(
        "a:\n  dry-run: true\n  deny:\n    - actor: x$\nb:\n  dry-run: true\n  allow: all\n",
        &whole(),
    );
    assert_eq!(w.len(), 3, "{w:#?}");
    assert!(
        w[0].starts_with("policies/test.yaml:2: a.dry-run: dry-run: this entry's deny rules"),
        "{}",
        w[0]
    );
    assert!(
        w[1].starts_with("policies/test.yaml:6: b.dry-run: dry-run: nothing in this entry"),
        "{}",
        w[1]
    );
    assert!(
        w[2].starts_with("policies/test.yaml: every entry of the policy is dry-run"),
        "{}",
        w[2]
    );
}

#[test]
fn check_warns_about_patterns_matching_empty_values() {
    let w = warnings(
        "i:\n  allow:\n    - actor: \".*\"\n    - claims: {x: \".*\"}\n",
        &whole(),
    );
    assert_eq!(w.len(), 1, "{w:#?}");
    assert!(
        w[0].starts_with(
            "policies/test.yaml:3: i.allow[0].actor: `.*` matches an empty value: in BuildGrid"
        ),
        "{}",
        w[0]
    );
}

#[test]
fn check_warns_about_bare_dots() {
    let w = warnings(
        "i:\n  allow:\n    - cert: {dns: ci.example.com$}\n",
        &whole(),
    );
    assert_eq!(
        w,
        ["policies/test.yaml:3: i.allow[0].cert.dns: `ci.example.com$`: `.` matches any character; write `\\.` for a literal dot"]
    );
    assert!(has_bare_dot("a.b"));
    assert!(!has_bare_dot("a\\.b"));
    assert!(!has_bare_dot("a.*"));
    assert!(!has_bare_dot("[.]"));
    assert!(!has_bare_dot("a.{2}"));
}

#[test]
fn check_reports_errors_as_errors() {
    let dir = TempDir::new();
    dir.write("a.yaml", "i:\n  allow:\n    - actor: \"(\"\n");
    let e = check(&dir.0, &whole(), KNOWN).expect_err("bad regex");
    assert!(
        e.to_string()
            .contains("a.yaml:3: i.allow[0].actor: invalid regex"),
        "{e}"
    );
}

#[test]
fn check_finds_lines_in_flow_and_block_style() {
    let yaml = "# header\n\nteam-a:\n  allow:\n\n    - {actor: x$, requests: [Writ]}\n    - actor: y$\n      requests:\n        - Read\n        - Reed\n";
    let w = warnings(yaml, &whole());
    assert_eq!(w.len(), 2, "{w:#?}");
    assert!(
        w[0].starts_with("policies/test.yaml:6: team-a.allow[0].requests[0]: unknown RPC `Writ`"),
        "{}",
        w[0]
    );
    assert!(
        w[1].starts_with("policies/test.yaml:10: team-a.allow[1].requests[1]: unknown RPC `Reed`"),
        "{}",
        w[1]
    );
}

// ---------------------------------------------------------------------------------
// The example policies shipped in policies/.

fn examples_dir() -> PathBuf {
    // The crate's own policies/ directory. CARGO_MANIFEST_DIR finds it when this file is
    // compiled as part of gridgate; file!() (relative to the crate root, where tests
    // run, or absolute) when it is compiled from elsewhere.
    let from_manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let from_source = Path::new(file!())
        .ancestors()
        .nth(4)
        .unwrap_or(Path::new(""))
        .join("policies");
    [from_manifest, from_source]
        .into_iter()
        .find(|dir| dir.join("team-a.yaml").is_file())
        .expect("the example policies directory")
}

#[test]
fn example_policies_load_and_check_cleanly() {
    let dir = examples_dir();
    for mode in [whole(), prefix()] {
        let w = check(&dir, &mode, KNOWN).expect("examples load");
        assert!(w.is_empty(), "{w:#?}");
    }
    let p = Policy::load(&dir, &whole()).expect("examples load");
    let names: Vec<_> = p
        .files()
        .iter()
        .filter_map(|f| f.file_name()?.to_str())
        .collect();
    for example in ["public.yaml", "team-a.yaml", "team-b.yaml"] {
        assert!(names.contains(&example), "{example} in {names:?}");
    }
    for instance in ["public", "team-a", "team-b"] {
        assert!(p.instances().iter().any(|i| i == instance), "{instance}");
    }
}

#[test]
fn example_team_a() {
    let p = Policy::load(&examples_dir(), &whole()).expect("examples load");
    let ci = |event: &str, protected: bool| {
        jwt(json!({
            "iss": "https://token.actions.githubusercontent.com",
            "sub": "repo:example-org/team-a:ref:refs/heads/main",
            "aud": "gridgate",
            "repository": "example-org/team-a",
            "repository_owner": "example-org",
            "ref_protected": protected,
            "event_name": event,
        }))
    };
    for rpc in [
        "FindMissingBlobs",
        "Write",
        "UpdateActionResult",
        "PublishBuildToolEventStream",
    ] {
        assert!(allowed(&p, "team-a", rpc, &ci("push", true)), "{rpc}");
    }
    let d = p.decide("team-a", "Write", &ci("pull_request", false));
    assert!(!d.allowed);
    assert!(
        d.reason
            .starts_with("denied by team-a.yaml: team-a deny[0]"),
        "{}",
        d.reason
    );
    assert!(allowed(
        &p,
        "team-a",
        "FindMissingBlobs",
        &ci("pull_request", false)
    ));
    assert!(allowed(
        &p,
        "team-a",
        "PublishBuildToolEventStream",
        &ci("pull_request", false)
    ));
    let mut fork = ci("push", true);
    Arc::make_mut(&mut fork.claims).insert("repository".into(), json!("someone/team-a"));
    assert!(!allowed(&p, "team-a", "Write", &fork));

    let human = jwt(json!({"sub": "alice@example.com", "aud": "gridgate"}));
    assert!(allowed(&p, "team-a", "GetActionResult", &human));
    assert!(allowed(&p, "team-a", "QueryEventStreams", &human));
    assert!(!allowed(&p, "team-a", "Write", &human));
    assert!(!allowed(
        &p,
        "team-a",
        "Read",
        &jwt(json!({"sub": "alice@example.com.evil.org"}))
    ));
    assert!(!allowed(&p, "team-a", "Read", &anon()));
}

#[test]
fn example_team_b() {
    let p = Policy::load(&examples_dir(), &whole()).expect("examples load");
    let bot = fields(Some("team-b-ci"), Some("team-b-ci"), Some("team-b-builds"));
    assert!(allowed(&p, "team-b", "Write", &bot));
    assert!(allowed(&p, "team-b", "Execute", &bot));
    assert!(!allowed(
        &p,
        "team-b",
        "Write",
        &fields(Some("team-b-ci-evil"), Some("x"), Some("team-b-builds"))
    ));
    let dev = fields(Some("bob"), Some("bob@example.com"), Some("team-b-builds"));
    assert!(allowed(&p, "team-b", "Read", &dev));
    assert!(!allowed(&p, "team-b", "Write", &dev));
    assert!(!allowed(&p, "team-b", "Read", &anon()));
}

#[test]
fn example_public() {
    let p = Policy::load(&examples_dir(), &whole()).expect("examples load");
    for rpc in [
        "GetCapabilities",
        "FindMissingBlobs",
        "BatchReadBlobs",
        "Read",
        "GetActionResult",
    ] {
        assert!(allowed(&p, "public", rpc, &anon()), "{rpc}");
    }
    for rpc in ["Write", "BatchUpdateBlobs", "UpdateActionResult", "Execute"] {
        assert!(!allowed(&p, "public", rpc, &anon()), "{rpc}");
    }
    let publisher = jwt(
        json!({"sub": "repo:example-org/website:ref:refs/heads/main", "iss": "https://token.actions.githubusercontent.com",
                              "repository": "example-org/website", "ref_protected": true}),
    );
    assert!(allowed(&p, "public", "Write", &publisher));
    assert!(!allowed(&p, "unlisted", "Read", &anon()));
}

// ---------------------------------------------------------------------------------
// Speed: `cargo test --release -- --ignored decide_speed --nocapture`.

#[test]
#[ignore]
fn decide_speed() {
    let p = Policy::load(&examples_dir(), &whole()).expect("examples load");
    let ci = jwt(
        json!({"iss": "https://token.actions.githubusercontent.com", "aud": "gridgate",
               "sub": "repo:example-org/team-a:ref:refs/heads/main", "repository": "example-org/team-a",
               "ref_protected": true, "event_name": "push"}),
    );
    let human = jwt(json!({"sub": "alice@example.com", "aud": "gridgate"}));
    let cases = [
        ("team-a", "Write", &ci, true),
        ("team-a", "FindMissingBlobs", &human, true),
        ("team-a", "Write", &human, false),
        ("public", "Read", &anon(), true),
        ("unlisted/x", "Read", &human, false),
    ];
    for (instance, rpc, id, expect) in cases {
        let n = 200_000;
        let start = std::time::Instant::now();
        for _ in 0..n {
            let d = p.decide(std::hint::black_box(instance), rpc, id);
            assert_eq!(d.allowed, expect);
        }
        let per = start.elapsed().as_nanos() / n;
        println!("{instance:>12} {rpc:<28} {per:>5} ns/decision");
    }
}
