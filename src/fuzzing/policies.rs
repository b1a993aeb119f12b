//! `policy`: ACL policy files.

use super::*;

/// Callers with and without each kind of value a rule can test.
pub(super) fn identities() -> &'static [Identity] {
    static IDS: OnceLock<Vec<Identity>> = OnceLock::new();
    IDS.get_or_init(|| {
        let mut claims = Map::new();
        claims.insert("ref".into(), Value::from("refs/heads/main"));
        claims.insert("ref_protected".into(), Value::from(true));
        claims.insert("run".into(), Value::from(42));
        claims.insert("groups".into(), Value::from(vec!["a", "b"]));
        let jwt = Identity {
            method: AuthMethod::Jwt,
            actor: Some("ci-bot".into()),
            subject: Some("user@example.com".into()),
            workflow: Some("build".into()),
            claims: Arc::new(claims),
            certificate: None,
        };
        let cert = Identity {
            method: AuthMethod::Certificate,
            certificate: Some(Arc::new(PeerCertificate {
                subject: "CN=ci-bot,O=Example".into(),
                common_name: Some("ci-bot".into()),
                dns_names: vec!["ci.example.com".into(), "a.example".into()],
                uris: vec!["spiffe://example/ci".into()],
                emails: vec!["ci@example.com".into()],
                ips: vec!["10.0.0.1".into()],
            })),
            ..Identity::anonymous(None)
        };
        let empty = Identity {
            method: AuthMethod::Headers,
            actor: Some(String::new()),
            subject: Some(String::new()),
            workflow: Some(String::new()),
            ..Identity::anonymous(None)
        };
        vec![Identity::anonymous(None), jwt, cert, empty]
    })
}

/// A directory of this process's own for files the checks write.
pub(super) fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("gridgate-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the scratch directory can be made");
        dir
    })
}

/// Fuzzes ACL policy files: the first byte chooses whole or prefix matching, the
/// rest (as UTF-8, lossily) is the file. A policy that loads answers every
/// question the same way twice, with a reason; `policy check` loads exactly what
/// `Policy::from_yaml` loads.
pub fn policy(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let opts = PolicyOptions {
        match_mode: if first & 1 == 0 {
            MatchMode::Whole
        } else {
            MatchMode::Prefix
        },
    };
    let text = String::from_utf8_lossy(rest);
    let loaded = Policy::from_yaml(&text, "fuzz.yaml", &opts);

    if first & 2 != 0 {
        let file = scratch_dir().join("policy.yaml");
        std::fs::write(&file, text.as_bytes()).expect("the scratch file can be written");
        let checked = policy::check(&file, &opts, &RouteTable::rpc_names());
        assert_eq!(
            checked.is_ok(),
            loaded.is_ok(),
            "policy check and the loader disagree: {:?} / {:?}",
            checked.as_ref().err(),
            loaded.as_ref().err()
        );
    }

    let Ok(policy) = loaded else {
        return;
    };
    let mut instances: Vec<String> = policy.instances().into_iter().take(8).collect();
    instances.extend(["", "team-a", "team-a/sub", "x/y/z"].map(String::from));
    for instance in &instances {
        for rpc in ["Write", "FindMissingBlobs", "Execute"] {
            for identity in identities() {
                let decision = policy.decide(instance, rpc, identity);
                assert!(!decision.reason.is_empty());
                assert!(decision.allowed || decision.dry_run_denied.is_none());
                assert_eq!(decision, policy.decide(instance, rpc, identity));
            }
        }
    }
}
