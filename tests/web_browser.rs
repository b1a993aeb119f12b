//! The web pages as a person uses them, end to end: Bazel 2.1.0 (npm) runs
//! a workspace with passing, failing and flaky tests, streams to gridgate
//! with `--bes_results_url` and uploads its test logs to gridgate's CAS;
//! Debian's Chromium, driven by `playwright-core`, opens the link Bazel
//! printed, signs in with OpenID Connect at a real `oidc-provider` on
//! loopback, and checks the page: the failed test first with its log, the
//! target filter, the list and its filters, the session cookie's flags,
//! sign-out. A user of another team signs in and gets 403.
//!
//! The npm packages (`playwright-core`, `oidc-provider`) are installed on
//! first use into `$GRIDGATE_TEST_CACHE/web-node` (else
//! `~/.cache/gridgate-tests/web-node`). Without Chromium, npm or Bazel the
//! test is skipped with a message, and fails when `CI` is set.
//!
//! With `GRIDGATE_SCREENSHOT_DIR=docs` it writes the README's screenshots
//! (`invocation.png`, `list.png`) there.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::bazel::bazel_binary;
use common::{Certs, TestServer};
use serde_json::Value;

const OP_SCRIPT: &str = include_str!("web_browser/op.mjs");
const DRIVE_SCRIPT: &str = include_str!("web_browser/drive.mjs");
const PACKAGES: [&str; 2] = ["oidc-provider@9.13.3", "playwright-core@1.65.1"];

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GRIDGATE_TEST_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    home.join(".cache").join("gridgate-tests")
}

fn unavailable(why: &str) -> Option<PathBuf> {
    if std::env::var_os("CI").is_some() {
        panic!("the browser test cannot run: {why}");
    }
    eprintln!("SKIPPED: {why}; set CI=1 to make this a failure");
    None
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The directory with node_modules/{oidc-provider,playwright-core},
/// installed with npm on first use (in a private directory, then renamed
/// into place, so tests running at once never see half an install).
fn node_dir() -> Option<PathBuf> {
    let dir = cache_dir().join("web-node");
    let ready = |d: &Path| {
        d.join("node_modules/oidc-provider/package.json").exists()
            && d.join("node_modules/playwright-core/package.json").exists()
    };
    if ready(&dir) {
        return Some(dir);
    }
    let parent = dir.parent()?.to_path_buf();
    let work = parent.join(format!(".web-node-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    if std::fs::create_dir_all(&work).is_err() {
        return unavailable(&format!("cannot create {}", work.display()));
    }
    let _ = std::fs::write(work.join("package.json"), "{\"private\":true}\n");
    eprintln!("installing {PACKAGES:?} with npm into {}", dir.display());
    let out = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund"])
        .args(PACKAGES)
        .current_dir(&work)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return unavailable(&format!(
                "npm install failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return unavailable(&format!("npm: {e}")),
    }
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::rename(&work, &dir).is_err() && !ready(&dir) {
        return unavailable("could not move the npm install into place");
    }
    let _ = std::fs::remove_dir_all(&work);
    Some(dir)
}

/// A child process ended when the test ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the OpenID provider; returns it and its issuer URL.
fn start_op(node: &Path, redirect_uri: &str, secret: &str) -> (Process, String) {
    let script = node.join(format!("op-{}.mjs", std::process::id()));
    std::fs::write(&script, OP_SCRIPT).unwrap();
    let mut child = Command::new("node")
        .arg(&script)
        .args([redirect_uri, secret])
        .current_dir(node)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(issuer) = line.strip_prefix("issuer ") {
                let _ = tx.send(issuer.to_string());
            }
        }
    });
    let issuer = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the OpenID provider started");
    (Process(child), issuer)
}

/// A free loopback port (for a public URL that must be known before binding).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The link Bazel printed after "Streaming build results to:".
fn results_link(text: &str) -> String {
    text.lines()
        .find_map(|l| l.split("Streaming build results to: ").nth(1))
        .map(|l| {
            l.trim()
                .trim_end_matches('\u{1b}')
                .split('\u{1b}')
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|| panic!("Bazel printed no results link:\n{text}"))
}

/// Debian's Bazel 4.2.3, or `None` (skipped, with a message) when it is not
/// installed; under `CI` a missing Bazel 4.2.3 fails the test.
fn bazel_4() -> Option<PathBuf> {
    let binary = PathBuf::from("/usr/bin/bazel");
    if binary.exists() && Path::new("/usr/share/bazel/rules/java").is_dir() {
        return Some(binary);
    }
    if std::env::var_os("CI").is_some() {
        panic!("/usr/bin/bazel is missing: .ci/run installs bazel-bootstrap and bazel-rules-java");
    }
    eprintln!("SKIPPED (Bazel 4.2.3 part): /usr/bin/bazel is not installed; `apt-get install -y bazel-bootstrap bazel-rules-java`");
    None
}

/// Bazel 4.2.3's own startup options and flags (as tests/invocations_bazel.rs).
const BAZEL_4_STARTUP: &[&str] = &["--install_base=/usr/share/bazel", "--trust_install_base"];
const BAZEL_4_FLAGS: &[&str] = &["--host_javabase=@local_jdk//:jdk"];

fn bazel_test(
    bazel: &Path,
    rules_java: &Path,
    (startup, flags): (&[&str], &[&str]),
    work: &Path,
    grpc: u16,
    web: u16,
) -> (i32, String) {
    let ws = work.join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    for name in ["WORKSPACE", "passes.sh", "fails.sh", "flaky.sh"] {
        std::fs::copy(fixtures().join("bep-workspace").join(name), ws.join(name)).unwrap();
    }
    std::fs::write(
        ws.join("BUILD"),
        "sh_test(name = \"passes\", srcs = [\"passes.sh\"], size = \"small\")\n\
         sh_test(name = \"fails\", srcs = [\"fails.sh\"], size = \"small\")\n\
         sh_test(name = \"flaky\", srcs = [\"flaky.sh\"], size = \"small\")\n",
    )
    .unwrap();
    for d in ["root", "home", "flaky"] {
        std::fs::create_dir_all(work.join(d)).unwrap();
    }
    let f = fixtures().join("bazel4");
    let child = Command::new(bazel)
        .args([
            "--batch",
            "--nosystem_rc",
            "--nohome_rc",
            "--noworkspace_rc",
        ])
        .args(startup)
        .arg(format!(
            "--output_user_root={}",
            work.join("root").display()
        ))
        .arg("test")
        .args(flags)
        .arg(format!(
            "--override_repository=remote_coverage_tools={}",
            f.join("remote_coverage_tools").display()
        ))
        .arg(format!(
            "--override_repository=rules_cc={}",
            f.join("rules_cc").display()
        ))
        .arg(format!(
            "--override_repository=rules_java={}",
            rules_java.display()
        ))
        .arg(format!("--bes_backend=grpc://127.0.0.1:{grpc}"))
        .arg(format!(
            "--bes_results_url=https://127.0.0.1:{web}/invocation/"
        ))
        .arg(format!("--remote_cache=grpc://127.0.0.1:{grpc}"))
        .args([
            "--remote_instance_name=team-a",
            "--project_id=team-a",
            "--bes_timeout=120s",
            "--build_metadata=BRANCH=main",
            "--build_metadata=REPO_URL=https://git.example/team-a/repo",
            "--spawn_strategy=standalone",
            "--flaky_test_attempts=2",
            "--keep_going",
            "--color=yes",
        ])
        .arg(format!(
            "--test_env=FLAKY_DIR={}",
            work.join("flaky").display()
        ))
        .args(["//:passes", "//:fails", "//:flaky"])
        .current_dir(&ws)
        .env("HOME", work.join("home"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bazel");
    let out = child.wait_with_output().expect("bazel output");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_links_to_a_page_people_sign_in_to_search_and_are_refused_by_team() {
    if !Path::new("/usr/bin/chromium").exists() {
        unavailable("/usr/bin/chromium is missing (apt-get install chromium)");
        return;
    }
    let Some(node) = node_dir() else { return };
    let Some(bazel) = bazel_binary() else { return };

    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("hmac.secret"),
        b"web-browser-test-secret-0123456789abcdef",
    )
    .unwrap();
    std::fs::write(
        d.join("session.key"),
        b"a session key of at least thirty-two bytes, for the test",
    )
    .unwrap();
    std::fs::write(d.join("client.secret"), "op-client-secret-for-the-test").unwrap();
    // Bazel 2.1 sends no credentials: team-a takes its builds and uploads
    // from anyone; only alice may look at them, only mallory at team-b's.
    std::fs::write(
        d.join("acl.yaml"),
        "team-a:\n  allow:\n    - requests: [PublishLifecycleEvent, PublishBuildToolEventStream, GetCapabilities, FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs, Write, Read, GetActionResult, UpdateActionResult]\n    - claims: { email: 'alice@example\\.com' }\n      requests: [QueryEventStreams, Read]\nteam-b:\n  allow:\n    - claims: { email: 'mallory@example\\.com' }\n      requests: [QueryEventStreams]\n",
    )
    .unwrap();
    let web_port = free_port();
    let public = format!("https://127.0.0.1:{web_port}");
    let (_op, issuer) = start_op(
        &node,
        &format!("{public}/auth/callback"),
        "op-client-secret-for-the-test",
    );
    let yaml = format!(
        "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n    insecure-mode: true\n\
         authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  acl-config: acl.yaml\n  allow-unauthenticated-instances: [team-a]\n\
         instances:\n  - name: team-a\n    cas: {{ backend: memory, max-bytes: 256M }}\n    action-cache: {{ allow-updates: true }}\n\
         build-events:\n  store: memory\n\
         web:\n  address: \"127.0.0.1:{web_port}\"\n  insecure-mode: false\n  credentials:\n    tls-server-key: {}\n    tls-server-cert: {}\n  public-url: \"{public}\"\n  session-key-file: session.key\n  oidc:\n    issuer: \"{issuer}\"\n    client-id: gridgate\n    client-secret-file: client.secret\n    scopes: [openid, email]\n    claims: {{ actor: [email], subject: [sub] }}\n",
        certs.server_key.display(),
        certs.server_cert.display(),
    );
    let server = TestServer::start(&yaml, d).await;
    let grpc = server.tcp().port();

    let work = tempfile::tempdir().unwrap();
    let bazel_run = {
        let (bazel, work) = (bazel.clone(), work.path().to_path_buf());
        let rules_java = fixtures().join("bazel4").join("rules_java");
        tokio::task::spawn_blocking(move || {
            bazel_test(&bazel, &rules_java, (&[], &[]), &work, grpc, web_port)
        })
    };
    let (code, text) = bazel_run.await.unwrap();
    assert_eq!(code, 3, "tests failed, so Bazel exits 3:\n{text}");
    let link = results_link(&text);
    assert!(link.starts_with(&format!("{public}/invocation/")), "{link}");
    let id = link.rsplit('/').next().unwrap().to_string();

    // Bazel 4.2.3 (Debian's, over plaintext: its TLS does not start) streams
    // the same workspace to the same gateway; its page is checked too.
    let work4 = tempfile::tempdir().unwrap();
    let link4 = match bazel_4() {
        Some(bazel4) => {
            let work4 = work4.path().to_path_buf();
            let (code, text) = tokio::task::spawn_blocking(move || {
                bazel_test(
                    &bazel4,
                    Path::new("/usr/share/bazel/rules/java"),
                    (BAZEL_4_STARTUP, BAZEL_4_FLAGS),
                    &work4,
                    grpc,
                    web_port,
                )
            })
            .await
            .unwrap();
            assert_eq!(code, 3, "Bazel 4.2.3: tests failed, so it exits 3:\n{text}");
            let link4 = results_link(&text);
            assert!(
                link4.starts_with(&format!("{public}/invocation/")),
                "{link4}"
            );
            Some(link4)
        }
        None => None,
    };

    let shots = match std::env::var_os("GRIDGATE_SCREENSHOT_DIR") {
        Some(d) => PathBuf::from(d),
        None => work.path().join("shots"),
    };
    std::fs::create_dir_all(&shots).unwrap();
    let profile = work.path().join("chromium-profile");
    let plan = serde_json::json!({
        "base": public,
        "invocation": link,
        "invocation4": link4,
        "shots": shots.canonicalize().unwrap(),
        "profile": profile,
    });
    let script = node.join(format!("drive-{}.mjs", std::process::id()));
    std::fs::write(&script, DRIVE_SCRIPT).unwrap();
    let drive = {
        let (script, node) = (script.clone(), node.clone());
        tokio::task::spawn_blocking(move || {
            Command::new("node")
                .arg(&script)
                .arg(plan.to_string())
                .current_dir(&node)
                .stdin(Stdio::null())
                .output()
                .expect("node")
        })
    };
    let out = tokio::time::timeout(Duration::from_secs(300), drive)
        .await
        .expect("the browser finished within 5 minutes")
        .unwrap();
    let _ = std::fs::remove_file(&script);
    let printed = String::from_utf8_lossy(&out.stdout);
    let seen: Value = printed
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no result from the browser: {printed}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        seen["error"].is_null(),
        "the browser failed: {}\nat {}: {}",
        seen["error"],
        seen["url"],
        seen["text"]
    );
    let s = &seen["steps"];

    // Bazel's link, unauthenticated: the sign-in page; after sign-in, the page.
    assert_eq!(s["alice"]["status"], 401, "{s}");
    assert_eq!(s["alice"]["signInShown"], true);
    assert_eq!(
        s["alice"]["backAt"],
        link.as_str(),
        "back where sign-in began"
    );
    let cookie = &s["alice"]["cookie"];
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["secure"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Lax", "{cookie}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expires = cookie["expires"].as_f64().unwrap();
    assert!(
        expires > now && expires <= now + 601.0,
        "expires with the 10-minute ID token: {expires} vs {now}"
    );

    let inv = &s["invocation"];
    assert_eq!(inv["status"], 200);
    assert_eq!(inv["state"], "Failed");
    // Failed first, then flaky; the failing attempt's log is on the page.
    assert_eq!(
        inv["problems"],
        serde_json::json!(["//:fails", "//:flaky"]),
        "{inv}"
    );
    assert_eq!(inv["problemStatus"][0], "FAILED");
    assert_eq!(inv["problemStatus"][1], "FLAKY");
    assert!(
        inv["firstLog"]
            .as_str()
            .unwrap()
            .contains("this test fails on purpose"),
        "{inv}"
    );
    assert_eq!(inv["tests"].as_array().unwrap().len(), 3);
    assert!(inv["console"].as_u64().unwrap() > 0);
    assert_eq!(s["targetFilter"], serde_json::json!(["//:fails"]), "{s}");
    if link4.is_some() {
        // Bazel 4.2.3's page: the same problems first, with the failing log.
        let inv4 = &s["invocation4"];
        assert_eq!(inv4["status"], 200, "{inv4}");
        assert_eq!(inv4["state"], "Failed", "{inv4}");
        assert_eq!(
            inv4["problems"],
            serde_json::json!(["//:fails", "//:flaky"]),
            "{inv4}"
        );
        assert_eq!(inv4["problemStatus"][0], "FAILED");
        assert_eq!(inv4["problemStatus"][1], "FLAKY");
        assert!(
            inv4["firstLog"]
                .as_str()
                .unwrap()
                .contains("this test fails on purpose"),
            "{inv4}"
        );
    }

    let href = format!("/invocation/{id}");
    let has = |key: &str| {
        s[key]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h == href.as_str())
    };
    assert!(has("list"), "the list shows the build: {s}");
    assert!(has("listFailed"), "state=failed, command=test: {s}");
    assert!(!has("listSucceeded"), "state=succeeded: {s}");
    assert_eq!(s["afterSignOut"], 0, "signed out");
    assert_eq!(
        seen["csp"],
        serde_json::json!([]),
        "no Content-Security-Policy violations"
    );

    // mallory is signed in, and refused with the reason.
    let m = &s["mallory"];
    assert_eq!(m["status"], 403, "{m}");
    assert!(
        m["reason"]
            .as_str()
            .unwrap()
            .contains("no rule lets you query its instance"),
        "{m}"
    );
    assert!(shots.join("invocation.png").exists() && shots.join("list.png").exists());
    server.stop().await;
}
