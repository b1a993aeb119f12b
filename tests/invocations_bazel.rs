//! Real Bazel clients publish to gridgate, and gridgate's invocation is
//! compared with what Bazel itself wrote to `--build_event_json_file`: the
//! same targets, the same test statuses, the same exit code. One workspace
//! (`tests/fixtures/bep-workspace`: passing, failing, flaky, timed-out and
//! sharded `sh_test`s, a failing genrule), a few Bazel runs per client:
//!
//! - Bazel 2.1.0 (npm; fetched on first use by tests/common/bazel.rs);
//! - Bazel 4.2.3 (Debian's `bazel-bootstrap`, installed by `.ci/run`; over
//!   plaintext, as its TLS does not start). Skipped with a message when
//!   /usr/bin/bazel is missing, unless `CI` is set;
//! - a Bazel killed mid-build: its invocation ends up abandoned.
//!
//! Bazel before 5 sends no headers on BES, so it publishes to `team-a`
//! anonymously (`allow-unauthenticated-instances`) and a token reads back.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::bazel::bazel_binary;
use common::{loopback_config, plain_channel, with_token, TestServer};
use gridgate::proto::gridgate::v1 as gg;
use gridgate::proto::gridgate::v1::invocations_client::InvocationsClient;
use serde_json::Value;
use tonic::transport::Channel;

const SECRET: &[u8] = b"invocations-bazel-secret-0123456789abcdef";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A token for the reader, the one identity that may query.
fn reader_token() -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    encode(
        &Header::default(),
        &serde_json::json!({"sub": "reader", "exp": now + 3600}),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

async fn gateway(dir: &Path) -> TestServer {
    std::fs::write(dir.join("hmac.secret"), SECRET).unwrap();
    std::fs::write(
        dir.join("acl.yaml"),
        "team-a:\n  allow:\n    - requests: [PublishLifecycleEvent, PublishBuildToolEventStream]\n    - actor: reader\n      requests: [QueryEventStreams]\n",
    )
    .unwrap();
    let yaml = loopback_config(
        "",
        "authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  acl-config: acl.yaml\n  allow-unauthenticated-instances: [team-a]\nbuild-events:\n  store: memory\n  retention: { abandoned-after: 3s }\n",
    );
    TestServer::start(&yaml, dir).await
}

/// A Bazel client and the flags it needs to build the workspace offline.
struct Client {
    name: &'static str,
    binary: PathBuf,
    startup: Vec<String>,
    flags: Vec<String>,
}

impl Client {
    fn bazel_2_1(binary: PathBuf) -> Client {
        let f = fixtures().join("bazel4");
        Client {
            name: "Bazel 2.1.0",
            binary,
            startup: vec![],
            flags: vec![
                format!(
                    "--override_repository=remote_coverage_tools={}",
                    f.join("remote_coverage_tools").display()
                ),
                format!(
                    "--override_repository=rules_cc={}",
                    f.join("rules_cc").display()
                ),
                format!(
                    "--override_repository=rules_java={}",
                    f.join("rules_java").display()
                ),
            ],
        }
    }

    /// Debian's Bazel 4.2.3, when installed (a failure under CI when not).
    fn bazel_4() -> Option<Client> {
        let binary = PathBuf::from("/usr/bin/bazel");
        if !binary.exists() {
            if std::env::var_os("CI").is_some() {
                panic!("/usr/bin/bazel is missing: .ci/run installs bazel-bootstrap and bazel-rules-java");
            }
            eprintln!("SKIPPED: /usr/bin/bazel (Debian's bazel-bootstrap) is not installed; `apt-get install -y bazel-bootstrap bazel-rules-java` (set CI=1 to make this a failure)");
            return None;
        }
        let f = fixtures().join("bazel4");
        Some(Client {
            name: "Bazel 4.2.3",
            binary,
            startup: vec![
                "--install_base=/usr/share/bazel".into(),
                "--trust_install_base".into(),
            ],
            flags: vec![
                format!(
                    "--override_repository=remote_coverage_tools={}",
                    f.join("remote_coverage_tools").display()
                ),
                format!(
                    "--override_repository=rules_cc={}",
                    f.join("rules_cc").display()
                ),
                "--override_repository=rules_java=/usr/share/bazel/rules/java".into(),
                "--host_javabase=@local_jdk//:jdk".into(),
            ],
        })
    }
}

/// A copy of the workspace with its own output root and home.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        for entry in std::fs::read_dir(fixtures().join("bep-workspace")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), ws.join(entry.file_name())).unwrap();
        }
        for d in ["root", "home", "flaky"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        Workspace { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `bazel --batch COMMAND` with the client's flags and ours, as a child
    /// in its own process group.
    fn command(&self, client: &Client, command: &str, args: &[String]) -> Command {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(&client.binary);
        c.args([
            "--batch",
            "--nosystem_rc",
            "--nohome_rc",
            "--noworkspace_rc",
        ])
        .args(&client.startup)
        .arg(format!(
            "--output_user_root={}",
            self.path("root").display()
        ))
        .arg(command)
        .args(&client.flags)
        .args(args)
        .current_dir(self.path("ws"))
        .env("HOME", self.path("home"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
        c
    }

    /// Runs it to the end (10 minutes at most): exit code and output.
    fn run(&self, client: &Client, command: &str, args: &[String]) -> (i32, String) {
        let child = self
            .command(client, command, args)
            .spawn()
            .expect("spawn bazel");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(out) => out.expect("bazel output"),
            Err(_) => {
                kill_group(pid);
                panic!("bazel {command} did not finish within 10 minutes");
            }
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        // Bazel leaves read-only directories in its output base.
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(self.dir.path())
            .status();
    }
}

/// Kills Bazel (its client becomes its Java server in batch mode) and what
/// it started (its process group).
fn kill_group(pid: u32) {
    for target in [format!("-{pid}"), pid.to_string()] {
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &target])
            .status();
    }
}

fn bes_flags(addr: std::net::SocketAddr, json: &Path) -> Vec<String> {
    vec![
        format!("--bes_backend=grpc://127.0.0.1:{}", addr.port()),
        "--project_id=team-a".into(),
        "--bes_timeout=120s".into(),
        "--bes_keywords=team-ci".into(),
        "--build_metadata=REPO=example/repo".into(),
        "--build_metadata=COMMIT=abc123".into(),
        "--spawn_strategy=standalone".into(),
        "--keep_going".into(),
        format!("--build_event_json_file={}", json.display()),
    ]
}

fn read_json(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The invocation gridgate has, with all its targets.
async fn fetch(ch: &Channel, id: &str) -> (gg::Invocation, BTreeMap<String, gg::Target>) {
    let token = reader_token();
    let mut targets = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let req = gg::GetInvocationRequest {
            instance_name: "team-a".into(),
            invocation_id: id.into(),
            page_size: 3,
            page_token,
        };
        let r = InvocationsClient::new(ch.clone())
            .get_invocation(with_token(req, &token))
            .await
            .unwrap()
            .into_inner();
        for t in r.targets {
            targets.insert(t.label.clone(), t);
        }
        if r.next_page_token.is_empty() {
            return (r.invocation.unwrap(), targets);
        }
        page_token = r.next_page_token;
    }
}

/// gridgate's invocation against Bazel's JSON of the same run.
async fn compare(client: &Client, ch: &Channel, json: &[Value], code: i32) -> gg::Invocation {
    let name = client.name;
    let started = json.iter().find_map(|e| e.get("started")).unwrap();
    let id = started["uuid"].as_str().unwrap();
    let (inv, targets) = fetch(ch, id).await;
    assert_eq!(inv.command, started["command"].as_str().unwrap(), "{name}");
    let finished = json.iter().find_map(|e| e.get("finished")).unwrap();
    assert_eq!(
        i64::from(inv.exit_code),
        finished["exitCode"]["code"].as_i64().unwrap_or(0),
        "{name}"
    );
    assert_eq!(inv.exit_code, code, "{name}: Bazel's own exit code");
    assert_eq!(
        inv.exit_code_name,
        finished["exitCode"]["name"].as_str().unwrap(),
        "{name}"
    );
    assert_eq!(
        inv.state(),
        if code == 0 {
            gg::InvocationState::Succeeded
        } else {
            gg::InvocationState::Failed
        },
        "{name}"
    );
    assert_eq!(
        inv.build_metadata.get("REPO").map(String::as_str),
        Some("example/repo"),
        "{name}"
    );
    assert!(
        inv.keywords.iter().any(|k| k == "user_keyword=team-ci"),
        "{name}: {:?}",
        inv.keywords
    );
    // The same targets, built or not as Bazel said.
    let mut completed = BTreeMap::new();
    for e in json {
        if let Some(c) = e.get("completed") {
            let label = e["id"]["targetCompleted"]["label"]
                .as_str()
                .unwrap()
                .to_string();
            completed.insert(label, c["success"].as_bool().unwrap_or(false));
        }
    }
    let ours: BTreeMap<String, bool> = targets
        .values()
        .filter(|t| t.completed)
        .map(|t| (t.label.clone(), t.success))
        .collect();
    assert_eq!(ours, completed, "{name}");
    // The same test statuses and attempts.
    let mut summaries = BTreeMap::new();
    let mut attempts: BTreeMap<String, usize> = BTreeMap::new();
    for e in json {
        if let Some(s) = e.get("testSummary") {
            let label = e["id"]["testSummary"]["label"]
                .as_str()
                .unwrap()
                .to_string();
            summaries.insert(label, s["overallStatus"].as_str().unwrap().to_string());
        }
        if e.get("testResult").is_some() {
            let label = e["id"]["testResult"]["label"].as_str().unwrap().to_string();
            *attempts.entry(label).or_default() += 1;
        }
    }
    let ours: BTreeMap<String, String> = targets
        .values()
        .filter_map(|t| Some((t.label.clone(), t.test.as_ref()?.status.clone())))
        .filter(|(_, s)| !s.is_empty())
        .collect();
    assert_eq!(ours, summaries, "{name}");
    for (label, n) in attempts {
        assert_eq!(
            targets[&label].test.as_ref().unwrap().runs.len(),
            n,
            "{name} {label}"
        );
    }
    assert_eq!(inv.counts.unwrap().undecodable_events, 0, "{name}");
    inv
}

/// `bazel build` of a failing genrule and `bazel test` of every kind of
/// test, each compared with Bazel's own JSON.
async fn build_and_test(client: Client) {
    let dir = tempfile::tempdir().unwrap();
    let server = gateway(dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    let ws = Workspace::new();
    let client = &client;

    let json = ws.path("build.json");
    let mut args = bes_flags(server.tcp(), &json);
    args.extend(["//:fine".to_string(), "//:broken".to_string()]);
    let (code, out) = tokio::task::block_in_place(|| ws.run(client, "build", &args));
    assert_eq!(code, 1, "{}: {out}", client.name);
    let inv = compare(client, &ch, &read_json(&json), code).await;
    let (_, targets) = fetch(&ch, &inv.invocation_id).await;
    let broken = &targets["//:broken"].action_failures;
    assert_eq!(broken.len(), 1, "{}: {broken:?}", client.name);
    assert_eq!(broken[0].mnemonic, "Genrule");

    let json = ws.path("test.json");
    let mut args = bes_flags(server.tcp(), &json);
    args.extend([
        "--flaky_test_attempts=2".to_string(),
        "--test_timeout=3".to_string(),
        format!("--test_env=FLAKY_DIR={}", ws.path("flaky").display()),
    ]);
    args.extend(["//:passes", "//:fails", "//:flaky", "//:slow", "//:sharded"].map(String::from));
    let (code, out) = tokio::task::block_in_place(|| ws.run(client, "test", &args));
    assert_eq!(code, 3, "{}: {out}", client.name);
    let inv = compare(client, &ch, &read_json(&json), code).await;
    let (_, targets) = fetch(&ch, &inv.invocation_id).await;
    let status = |l: &str| targets[l].test.as_ref().unwrap().status.clone();
    assert_eq!(
        [
            status("//:passes"),
            status("//:fails"),
            status("//:flaky"),
            status("//:slow"),
            status("//:sharded")
        ],
        ["PASSED", "FAILED", "FLAKY", "TIMEOUT", "PASSED"].map(String::from),
        "{}",
        client.name
    );
    assert_eq!(targets["//:sharded"].test.as_ref().unwrap().shard_count, 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_2_1_invocations_match_its_own_build_event_json() {
    let Some(bazel) = tokio::task::spawn_blocking(bazel_binary).await.unwrap() else {
        return;
    };
    build_and_test(Client::bazel_2_1(bazel)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_4_2_invocations_match_its_own_build_event_json() {
    let Some(client) = Client::bazel_4() else {
        return;
    };
    build_and_test(client).await;
}

/// Bazel killed while its test sleeps: the invocation stays running while
/// the stream is open, then reads as abandoned once it has been silent for
/// `abandoned-after` (3 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_bazel_leaves_an_abandoned_invocation() {
    let Some(bazel) = tokio::task::spawn_blocking(bazel_binary).await.unwrap() else {
        return;
    };
    let client = Client::bazel_2_1(bazel);
    let dir = tempfile::tempdir().unwrap();
    let server = gateway(dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    let ws = Workspace::new();
    let mut args = bes_flags(server.tcp(), &ws.path("killed.json"));
    args.extend(["--test_timeout=300".to_string(), "//:slow".to_string()]);
    let mut child = ws.command(&client, "test", &args).spawn().unwrap();
    let pid = child.id();
    let token = reader_token();
    let list = || {
        let req = gg::ListInvocationsRequest {
            instance_name: "team-a".into(),
            ..Default::default()
        };
        let mut c = InvocationsClient::new(ch.clone());
        let token = token.clone();
        async move {
            c.list_invocations(with_token(req, &token))
                .await
                .unwrap()
                .into_inner()
                .invocations
        }
    };
    // Wait until the test is running (its TestResult never comes).
    let deadline = Instant::now() + Duration::from_secs(300);
    let running = loop {
        assert!(Instant::now() < deadline, "Bazel never got to the test");
        if let Ok(Some(status)) = child.try_wait() {
            panic!("Bazel ended before it was killed: {status}");
        }
        let found = list().await;
        if let Some(i) = found.first() {
            let (_, targets) = fetch(&ch, &i.invocation_id).await;
            if targets.get("//:slow").is_some_and(|t| t.configured) && !i.patterns.is_empty() {
                break i.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(running.state(), gg::InvocationState::Running);
    kill_group(pid);
    let status = child.wait().unwrap();
    assert!(!status.success(), "Bazel was killed: {status:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (inv, _) = fetch(&ch, &running.invocation_id).await;
        if inv.state() == gg::InvocationState::Abandoned {
            assert_eq!(inv.exit_code_name, "", "no finish was seen");
            break;
        }
        assert_eq!(inv.state(), gg::InvocationState::Running);
        assert!(Instant::now() < deadline, "not abandoned within a minute");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    server.stop().await;
}
