use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

fn parse_in(dir: &Path, text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "test.yaml", dir)
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_in(Path::new("."), text)
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn embedded_default_is_open_loopback_with_memory_stores() {
    let c = Config::embedded_default().unwrap();
    assert_eq!(c.channels.len(), 1);
    assert_eq!(
        c.channels[0].listen,
        ListenAddr::Tcp("127.0.0.1:50051".parse().unwrap())
    );
    assert!(c.channels[0].tls.is_none());
    assert_eq!(c.authorization.method, AuthMethod::None);
    assert_eq!(c.instances[0].name, "");
    assert!(matches!(
        c.instances[0].backend,
        InstanceBackend::Local {
            cas: CasConfig::Memory {
                max_bytes: 1073741824
            },
            ..
        }
    ));
    assert!(matches!(c.build_events, BuildEventsConfig::Memory { .. }));
}

#[test]
fn unknown_key_names_its_path() {
    let e = parse(
        "server:\n  - !channel\n    address: 127.0.0.1:0\n    insecure-mode: true\n    tls: yes\n",
    )
    .unwrap_err();
    assert_eq!(e.file, "test.yaml");
    assert_eq!(e.key, "server[0].tls");
    assert!(e.reason.contains("unknown field `tls`"), "{e}");

    let e = parse("server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\nauthorization:\n  method: none\n  acl-confg: x\n").unwrap_err();
    assert_eq!(e.key, "authorization.acl-confg");
    assert!(e.reason.contains("acl-confg"), "{e}");
}

#[test]
fn wrong_type_names_its_path() {
    let e = parse("server:\n  - address: 127.0.0.1:0\n    insecure-mode: maybe\n").unwrap_err();
    assert_eq!(e.key, "server[0].insecure-mode");
    assert!(e.reason.contains("invalid type"), "{e}");
}

#[test]
fn missing_tls_file_is_an_error_not_plaintext() {
    let d = tempdir();
    let e = parse_in(
        d.path(),
        "server:\n  - !channel\n    address: 127.0.0.1:0\n    insecure-mode: false\n    credentials:\n      tls-server-key: nope.key\n      tls-server-cert: nope.crt\n",
    )
    .unwrap_err();
    assert_eq!(e.key, "server[0].credentials.tls-server-key");
    assert!(e.reason.contains("nope.key"), "{e}");
}

#[test]
fn insecure_mode_with_credentials_is_refused() {
    let d = tempdir();
    std::fs::write(d.path().join("k"), "x").unwrap();
    let e = parse_in(
        d.path(),
        "server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\n    credentials:\n      tls-server-key: k\n      tls-server-cert: k\n",
    )
    .unwrap_err();
    assert_eq!(e.key, "server[0].insecure-mode");
}

#[test]
fn buildgrid_null_credentials_mean_plaintext() {
    let c = parse("server:\n  - !channel\n    address: 127.0.0.1:0\n    insecure-mode: true\n    credentials:\n      tls-server-key: null\n      tls-server-cert: null\n      tls-client-certs: null\n").unwrap();
    assert!(c.channels[0].tls.is_none());
}

#[test]
fn open_non_loopback_needs_allow_open() {
    let e = parse("server:\n  - address: \"[::]:50051\"\n    insecure-mode: true\n").unwrap_err();
    assert_eq!(e.key, "server[0].address");
    assert!(e.reason.contains("allow-open"), "{e}");
    let c = parse(
        "server:\n  - address: \"0.0.0.0:50051\"\n    insecure-mode: true\n    allow-open: true\n",
    )
    .unwrap();
    assert!(c.channels[0].allow_open);
    // A Unix socket is local.
    parse("server:\n  - address: unix:///tmp/gg.sock\n    insecure-mode: true\n").unwrap();
}

#[test]
fn none_with_acl_is_refused() {
    let e = parse(
        "server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\nauthorization:\n  method: none\n  acl-config: policies/\n",
    )
    .unwrap_err();
    assert_eq!(e.key, "authorization.acl-config");
}

#[test]
fn jwt_needs_algorithm_and_a_key() {
    let d = tempdir();
    std::fs::write(d.path().join("s"), "0123456789abcdef0123456789abcdef\n").unwrap();
    let base = "server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\nauthorization:\n  method: jwt\n";
    let e = parse_in(d.path(), &format!("{base}  secret: s\n")).unwrap_err();
    assert_eq!(e.key, "authorization.algorithm");
    let e = parse_in(d.path(), &format!("{base}  algorithm: hs256\n")).unwrap_err();
    assert!(e.reason.contains("needs a key"), "{e}");
    let e = parse_in(
        d.path(),
        &format!("{base}  algorithm: hs999\n  secret: s\n"),
    )
    .unwrap_err();
    assert!(e.reason.contains("unknown algorithm"), "{e}");
    let c = parse_in(
        d.path(),
        &format!("{base}  algorithm: HS256\n  secret: s\n  audience: [a, b]\n"),
    )
    .unwrap();
    let jwt = c.authorization.jwt.unwrap();
    assert!(matches!(&jwt.providers[0].key, JwtKeyConfig::Secret(s) if s.len() == 32));
    assert_eq!(jwt.providers[0].audiences, vec!["a", "b"]);
    // Which URLs may serve keys is the verifier's rule: see gate::tests.
    parse_in(d.path(), &format!("{base}  algorithm: rs256\n  jwks-url: [\"http://127.0.0.1:9/jwks\", \"https://x/jwks\"]\n")).unwrap();
}

#[test]
fn durations_that_would_overflow_are_refused() {
    // Found by fuzzing: `minutes * 60` and the token checks' `now - leeway` overflowed.
    let d = tempdir();
    std::fs::write(d.path().join("s"), "0123456789abcdef0123456789abcdef\n").unwrap();
    let base = "server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\nauthorization:\n  method: jwt\n";
    let hmac = format!("{base}  algorithm: hs256\n  secret: s\n");
    let jwks = format!("{base}  algorithm: rs256\n  jwks-url: https://keys.example/jwks\n");
    for (text, key) in [
        (
            format!("{hmac}  leeway-seconds: 99999999999\n"),
            "authorization.leeway-seconds",
        ),
        (
            format!("{hmac}  max-token-lifetime-minutes: 307445734561825861\n"),
            "authorization.max-token-lifetime-minutes",
        ),
        (
            format!("{jwks}  jwks-fetch-minutes: 307445734561825861\n"),
            "authorization.jwks-fetch-minutes",
        ),
        (
            format!("{jwks}  jwks-max-staleness-minutes: 52560001\n"),
            "authorization.jwks-max-staleness-minutes",
        ),
    ] {
        let e = parse_in(d.path(), &text).unwrap_err();
        assert_eq!(e.key, key, "{e}");
    }
    let c = parse_in(
        d.path(),
        &format!("{hmac}  leeway-seconds: 86400\n  max-token-lifetime-minutes: 52560000\n"),
    )
    .unwrap();
    let jwt = c.authorization.jwt.unwrap();
    assert_eq!(jwt.leeway, Duration::from_secs(86_400));
    assert_eq!(
        jwt.max_token_lifetime,
        Some(Duration::from_secs(52_560_000 * 60))
    );
}

#[test]
fn older_spelling_of_unauthenticated_instances() {
    let d = tempdir();
    std::fs::write(d.path().join("s"), "0123456789abcdef0123456789abcdef").unwrap();
    let c = parse_in(d.path(), "server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\nauthorization:\n  method: jwt\n  algorithm: hs256\n  secret: s\n  allow-unauthorized-instances: [public]\n").unwrap();
    assert_eq!(
        c.authorization.allow_unauthenticated_instances,
        vec!["public"]
    );
}

#[test]
fn expand_vars_tag_and_sizes() {
    std::env::set_var("GRIDGATE_TEST_CFG_DIR", "/tmp/gg-cas");
    let c = parse("server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\ninstances:\n  - name: a\n    cas: { backend: disk, path: !expand-vars $GRIDGATE_TEST_CFG_DIR, max-bytes: 2048M }\n").unwrap();
    assert_eq!(
        c.instances[0].backend,
        InstanceBackend::Local {
            cas: CasConfig::Disk {
                path: PathBuf::from("/tmp/gg-cas"),
                max_bytes: 2048 << 20
            },
            action_cache: ActionCacheConfig {
                allow_updates: true,
                max_entries: 1_000_000
            }
        }
    );
}

#[test]
fn instances_and_build_events_validate() {
    let base = "server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\n";
    let e = parse(&format!("{base}instances:\n  - name: a\n  - name: a\n")).unwrap_err();
    assert_eq!(e.key, "instances[1].name");
    let e = parse(&format!("{base}instances:\n  - name: x/blobs\n")).unwrap_err();
    assert!(e.reason.contains("blobs"), "{e}");
    let e = parse(&format!(
        "{base}instances:\n  - name: p\n    upstream: {{ address: \"buildgrid:50051\" }}\n"
    ))
    .unwrap_err();
    assert_eq!(e.key, "instances[0].upstream.address");
    let c = parse(&format!("{base}instances:\n  - name: p\n    upstream: {{ address: \"grpc://127.0.0.1:50052\", instance-name: \"\" }}\nbuild-events:\n  store: {{ postgres: \"postgres://postgres@127.0.0.1/test\" }}\n")).unwrap();
    assert!(matches!(c.instances[0].backend, InstanceBackend::Upstream(ref u) if !u.tls));
    assert!(matches!(c.build_events, BuildEventsConfig::Postgres { .. }));
    let e = parse(&format!("{base}build-events:\n  store: {{ sqlite: x }}\n")).unwrap_err();
    assert_eq!(e.key, "build-events.store");
}

#[test]
fn buildgrid_service_sections_are_explained() {
    let e = parse("server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\nstorages:\n  - !lru-storage &cas\n    size: 2048M\n").unwrap_err();
    assert_eq!(e.key, "storages");
    assert!(e.reason.contains("instances:"), "{e}");
}

#[test]
fn monitoring_keys_are_buildgrids() {
    let base = "server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\n";
    let c = parse(&format!("{base}monitoring:\n  enabled: true\n  endpoint-type: udp\n  endpoint-location: 127.0.0.1:8125\n  serialization-format: statsd\n  metric-prefix: gg..\n  tag-format: dogstatsd\n  additional-tags: {{ env: prod }}\n")).unwrap();
    assert_eq!(c.monitoring.metric_prefix, "gg.");
    let e = parse(&format!(
        "{base}monitoring:\n  serialization-format: binary\n"
    ))
    .unwrap_err();
    assert_eq!(e.key, "monitoring.serialization-format");
}

#[test]
fn compression_values() {
    let base = "server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\n";
    assert_eq!(
        parse(&format!("{base}grpc-compression: Gzip\n"))
            .unwrap()
            .compression,
        Compression::Gzip
    );
    assert_eq!(
        parse(&format!("{base}grpc-compression: NoCompression\n"))
            .unwrap()
            .compression,
        Compression::None
    );
    assert_eq!(
        parse(&format!("{base}grpc-compression: zstd\n"))
            .unwrap()
            .compression,
        Compression::Zstd
    );
    assert!(parse(&format!("{base}grpc-compression: lz4\n")).is_err());
}

#[test]
fn build_events_max_event_bytes() {
    let base = "server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\n";
    let c = parse(base).unwrap();
    assert_eq!(c.build_events_limits.max_event_bytes, 4 << 20);
    let c = parse(&format!(
        "{base}build-events:\n  store: {{ file: ev.redb }}\n  max-event-bytes: 64K\n"
    ))
    .unwrap();
    assert_eq!(c.build_events_limits.max_event_bytes, 64 << 10);
    let e = parse(&format!("{base}build-events:\n  max-event-bytes: 12\n")).unwrap_err();
    assert_eq!(e.key, "build-events.max-event-bytes");
    let e = parse(&format!("{base}build-events:\n  max-event-bytes: lots\n")).unwrap_err();
    assert_eq!(e.key, "build-events.max-event-bytes");
}

#[test]
fn build_events_retention() {
    let base = "server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\n";
    let d = parse(base).unwrap().build_events_limits;
    assert_eq!(d.max_age, None, "kept by default");
    assert_eq!(d.abandoned_after, Some(Duration::from_secs(86_400)));
    let c = parse(&format!(
        "{base}build-events:\n  retention: {{ max-age: 30d, abandoned-after: 90m }}\n"
    ))
    .unwrap()
    .build_events_limits;
    assert_eq!(c.max_age, Some(Duration::from_secs(30 * 86_400)));
    assert_eq!(c.abandoned_after, Some(Duration::from_secs(90 * 60)));
    let c = parse(&format!(
        "{base}build-events:\n  retention: {{ max-age: 2w, abandoned-after: none }}\n"
    ))
    .unwrap()
    .build_events_limits;
    assert_eq!(c.max_age, Some(Duration::from_secs(14 * 86_400)));
    assert_eq!(c.abandoned_after, None);
    for (yaml, key, says) in [
        ("max-age: '30'", "build-events.retention.max-age", "unit"),
        ("max-age: 30", "build-events.retention.max-age", "string"),
        ("max-age: 0d", "build-events.retention.max-age", "zero"),
        ("max-age: 3y", "build-events.retention.max-age", "unit"),
        (
            "max-age: 99999999999w",
            "build-events.retention.max-age",
            "100 years",
        ),
        (
            "abandoned-after: soon",
            "build-events.retention.abandoned-after",
            "age",
        ),
    ] {
        let e = parse(&format!("{base}build-events:\n  retention: {{ {yaml} }}\n")).unwrap_err();
        assert_eq!(e.key, key, "{yaml}");
        assert!(e.reason.contains(says), "{yaml}: {}", e.reason);
    }
    let e = parse(&format!(
        "{base}build-events:\n  retention: {{ max_age: 1d }}\n"
    ))
    .unwrap_err();
    assert!(e.to_string().contains("max_age"), "{e}");
}

#[test]
fn max_frame_bytes_within_http2_bounds() {
    let base = "server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\n";
    assert_eq!(parse(base).unwrap().limits.max_frame_size, 256 * 1024);
    let c = parse(&format!("{base}limits:\n  max-frame-bytes: 16384\n")).unwrap();
    assert_eq!(c.limits.max_frame_size, 16384);
    let c = parse(&format!("{base}limits:\n  max-frame-bytes: 16777215\n")).unwrap();
    assert_eq!(c.limits.max_frame_size, 16_777_215);
    for bad in ["16383", "16777216"] {
        let e = parse(&format!("{base}limits:\n  max-frame-bytes: {bad}\n")).unwrap_err();
        assert_eq!(e.key, "limits.max-frame-bytes");
        assert!(e.reason.contains(bad), "{}", e.reason);
    }
}

/// Files named by a config that are FIFOs are refused with the key at fault,
/// at once: opening one for reading would block start-up until a writer came.
#[test]
fn fifos_are_refused_without_blocking() {
    const CHANNEL: &str =
        "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n    insecure-mode: true\n";
    let dir = tempdir();
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(
        made.is_ok_and(|s| s.success()),
        "mkfifo (coreutils) is needed for this test"
    );
    let base = dir.path().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let tag = parse_in(
            &base,
            &format!("{CHANNEL}monitoring:\n  enabled: true\n  endpoint-type: udp\n  endpoint-location: !read-file fifo\n"),
        )
        .map(|_| ());
        let secret = parse_in(
            &base,
            &format!(
                "{CHANNEL}authorization:\n  method: jwt\n  algorithm: hs256\n  secret: fifo\n"
            ),
        )
        .map(|_| ());
        let policy =
            crate::gate::policy::Policy::load(&base.join("fifo"), &Default::default()).map(|_| ());
        let _ = tx.send((tag, secret, policy));
    });
    let (tag, secret, policy) = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("reading a FIFO blocked");
    let tag = tag.unwrap_err();
    assert!(tag.key.contains("endpoint-location"), "{tag}");
    assert!(tag.reason.contains("not a regular file"), "{tag}");
    let secret = secret.unwrap_err();
    assert!(secret.key.contains("secret"), "{secret}");
    assert!(secret.reason.contains("is not a file"), "{secret}");
    let policy = policy.unwrap_err().to_string();
    assert!(policy.contains("not a regular file"), "{policy}");
}

#[test]
fn addresses_are_shown_without_userinfo() {
    for (address, shown) in [
        ("grpc://user:password@host:1", "grpc://host:1"),
        ("grpcs://tok@[::1]:443/path@x", "grpcs://[::1]:443/path@x"),
        ("grpc://a@b@host:1", "grpc://host:1"),
        ("user:password@host:1", "host:1"),
        ("grpc://host:1", "grpc://host:1"),
        ("grpc://host:1/?q=a@b", "grpc://host:1/?q=a@b"),
    ] {
        assert_eq!(without_userinfo(address), shown, "{address}");
    }
    let base = "server:\n  - address: 127.0.0.1:0\n    insecure-mode: true\n";
    let c = parse(&format!("{base}instances:\n  - name: p\n    upstream: {{ address: \"grpc://ci:s3cret@127.0.0.1:50052\", headers: {{ x-token: t0ken }} }}\n")).unwrap();
    let InstanceBackend::Upstream(u) = &c.instances[0].backend else {
        panic!("not an upstream")
    };
    let debug = format!("{u:?}");
    assert!(
        !debug.contains("s3cret") && !debug.contains("t0ken"),
        "{debug}"
    );
    assert!(c.summary().contains("upstream grpc://127.0.0.1:50052"));
    assert!(!c.summary().contains("s3cret"));
}
