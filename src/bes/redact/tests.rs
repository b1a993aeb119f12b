//! Unit tests of credential redaction in build events.

use super::*;
use crate::proto::google::devtools::build::v1::{
    build_event, BuildEvent, OrderedBuildEvent, StreamId,
};
use prost::Message;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field.
fn ld(field: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint(&mut out, field << 3 | 2);
    put_varint(&mut out, payload.len() as u64);
    out.extend_from_slice(payload);
    out
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// A `build_event_stream.BuildEvent` as Bazel encodes one, written by
/// hand from build_event_stream.proto: the id, then the
/// `unstructured_command_line` (12), `structured_command_line` (22) and
/// `options_parsed` (13) payloads carrying credentials. (Bazel sends
/// each in its own event; one event holding all three exercises the same
/// paths.)
fn bazel_command_line_event() -> Vec<u8> {
    // BuildEventId { unstructured_command_line = 11 {} }
    let id = ld(1, &ld(11, &[]));
    let unstructured = ld(
        12,
        &cat(&[
            ld(1, b"build"),
            ld(1, b"//:hello"),
            ld(1, b"--remote_header=Authorization=Bearer SECRET1abc.def"),
            ld(1, b"--bes_header"),
            ld(1, b"x-api-key=SECRET2"),
            ld(1, b"--remote_cache=grpcs://alice:SECRET3@cache.example:443"),
            ld(1, "--jobs=8 ✓ keep".as_bytes()),
        ]),
    );
    // Option { combined_form=1, option_name=2, option_value=3, effect_tags=4 (packed) }
    let option = cat(&[
        ld(1, b"--remote_cache_header=Authorization=Bearer SECRET4"),
        ld(2, b"remote_cache_header"),
        ld(3, b"Authorization=Bearer SECRET4"),
        ld(4, &[1, 13]),
    ]);
    let keep_option = cat(&[ld(1, b"--color=yes"), ld(2, b"color"), ld(3, b"yes")]);
    // CommandLine { command_line_label=1, sections=2 { section_label=1, option_list=3 { option=1 } } }
    let structured = ld(
        22,
        &cat(&[
            ld(1, b"original"),
            ld(
                2,
                &cat(&[
                    ld(1, b"command options"),
                    ld(3, &cat(&[ld(1, &option), ld(1, &keep_option)])),
                ]),
            ),
        ]),
    );
    // OptionsParsed { cmd_line=3, explicit_cmd_line=4 }
    let parsed = ld(
        13,
        &cat(&[
            ld(3, b"--bes_header=X-Token=SECRET5"),
            ld(4, b"--remote_exec_header=authorization=SECRET6"),
            ld(4, b"--bes_backend=grpcs://bes.example"),
        ]),
    );
    cat(&[id, unstructured, structured, parsed])
}

fn ordered(event: build_event::Event) -> OrderedBuildEvent {
    OrderedBuildEvent {
        stream_id: Some(StreamId {
            build_id: "9b2ce6a0-build".into(),
            invocation_id: "0f3e-inv".into(),
            component: 3,
        }),
        sequence_number: 4,
        event: Some(BuildEvent {
            event_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 1,
            }),
            event: Some(event),
        }),
    }
}

/// Asserts that `after` differs from `before` only by `*` bytes.
fn only_masked(before: &[u8], after: &[u8]) {
    assert_eq!(before.len(), after.len());
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        assert!(a == b || *b == MASK, "byte {i} changed to {b:#x}");
    }
}

#[test]
fn redacts_a_bazel_command_line_event_in_place() {
    let payload = bazel_command_line_event();
    let event = ordered(build_event::Event::BazelEvent(prost_types::Any {
        type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
        value: payload.clone(),
    }));
    let before = event.encode_to_vec();
    let mut after = before.clone();
    let n = redact_message(&mut after);
    only_masked(&before, &after);
    let text = String::from_utf8_lossy(&after);
    for secret in ["SECRET", "alice"] {
        assert!(!text.contains(secret), "{secret} left in {text}");
    }
    assert!(n >= 7, "{n} redactions");
    // Still a valid event with the same structure; names stay readable.
    let decoded = OrderedBuildEvent::decode(after.as_slice()).unwrap();
    let Some(build_event::Event::BazelEvent(any)) = decoded.event.unwrap().event else {
        panic!("kind changed")
    };
    let inner = String::from_utf8_lossy(&any.value);
    for kept in [
        "--remote_header=Authorization=***",
        "--bes_header",
        "x-api-key=*******",
        "grpcs://*************@cache.example:443",
        "remote_cache_header",
        "Authorization=***",
        "--jobs=8 ✓ keep",
        "--color=yes",
        "--bes_header=X-Token=******",
        "--remote_exec_header=authorization=*******",
        "--bes_backend=grpcs://bes.example",
    ] {
        assert!(inner.contains(kept), "{kept:?} not in {inner}");
    }
    // The packed effect tags and the event id are untouched.
    assert_eq!(&any.value[..4], &payload[..4]);
    assert!(any.value.windows(4).any(|w| w == [0x22, 0x02, 1, 13]));
}

#[test]
fn redacts_console_output_and_leaves_clean_events_alone() {
    let event = ordered(build_event::Event::ConsoleOutput(
        build_event::ConsoleOutput {
            r#type: 2,
            output: Some(build_event::console_output::Output::TextOutput(
                "\u{1b}[32mINFO:\u{1b}[0m curl -H 'authorization: Bearer tok_123' https://bob:pw@host/x\nnext line".into(),
            )),
        },
    ));
    let before = event.encode_to_vec();
    let mut after = before.clone();
    assert_eq!(redact_message(&mut after), 2);
    only_masked(&before, &after);
    let decoded = OrderedBuildEvent::decode(after.as_slice()).unwrap();
    let Some(build_event::Event::ConsoleOutput(c)) = decoded.event.unwrap().event else {
        panic!("kind changed")
    };
    let Some(build_event::console_output::Output::TextOutput(t)) = c.output else {
        panic!("output changed")
    };
    assert_eq!(
        t,
        "\u{1b}[32mINFO:\u{1b}[0m curl -H 'authorization: Bearer *******' https://******@host/x\nnext line"
    );

    let clean = ordered(build_event::Event::BazelEvent(prost_types::Any {
        type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
        value: cat(&[ld(1, &ld(3, &ld(1, b"//:hello"))), ld(4, b"authored by me")]),
    }));
    let before = clean.encode_to_vec();
    let mut after = before.clone();
    assert_eq!(redact_message(&mut after), 0);
    assert_eq!(before, after);
}

#[test]
fn text_rules() {
    let cases = [
        (
            "--remote_header=Authorization=Bearer abc",
            "--remote_header=Authorization=**********",
        ),
        ("'--bes_header=k=v' --jobs=2", "'--bes_header=k=*' --jobs=2"),
        (
            "Proxy-Authorization: Basic dXNlcjpw",
            "Proxy-Authorization: Basic ********",
        ),
        (
            "{\"authorization\": \"Bearer x.y.z\"}",
            "{\"authorization\": \"Bearer *****\"}",
        ),
        (
            "https://token@github.com/a/b",
            "https://*****@github.com/a/b",
        ),
        ("mail alice@example.com", "mail alice@example.com"),
    ];
    for (input, want) in cases {
        let mut b = input.as_bytes().to_vec();
        redact_text(&mut b);
        assert_eq!(String::from_utf8(b).unwrap(), want, "input {input:?}");
    }
}

/// Redacts `input` as free text.
fn redacted(input: &str) -> String {
    let mut b = input.as_bytes().to_vec();
    redact_text(&mut b);
    String::from_utf8(b).expect("still UTF-8")
}

#[test]
fn secret_looking_names() {
    for name in [
        "GITHUB_TOKEN",
        "npm_auth",
        "NPM_CONFIG__AUTH",
        "OAUTH",
        "MY_SECRET",
        "client_secrets",
        "DB_PASSWORD",
        "PGPASSWD",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "google_credentials_json",
        "API_KEY",
        "APIKEY",
        "apiKey",
        "aws_secret_access_key",
        "X-Auth-Token",
        "PRIVATE-TOKEN",
        "Proxy-Authorization",
        "SSH_KEYS",
        "Set-Cookie",
        "DB_PASS",
        "GH_PAT",
        "token",
        "KEY2",
    ] {
        assert!(secret_name(name.as_bytes()), "{name}");
    }
    for name in [
        "PATH",
        "HOME",
        "KEYBOARD_LAYOUT",
        "GIT_AUTHOR_NAME",
        "AUTHORS",
        "TOKENIZERS_PARALLELISM",
        "SECRETARY",
        "PASSPORT",
        "COMPASS",
        "PWD",
        "action_env",
        "keyboardLayout",
        "",
    ] {
        assert!(!secret_name(name.as_bytes()), "{name}");
    }
}

#[test]
fn environment_flags_with_secret_looking_names() {
    for (input, want) in [
        (
            "--action_env=GITHUB_TOKEN=ghp_abc123",
            "--action_env=GITHUB_TOKEN=**********",
        ),
        ("--client_env=npm_auth=xyz", "--client_env=npm_auth=***"),
        ("--repo_env=MY_SECRET=a b c", "--repo_env=MY_SECRET=*****"),
        (
            "--host_action_env=DB_PASSWORD=pw",
            "--host_action_env=DB_PASSWORD=**",
        ),
        ("--test_env=ApiKey=k1", "--test_env=ApiKey=**"),
        (
            "'--action_env=AWS_SECRET_ACCESS_KEY=abc' //:x",
            "'--action_env=AWS_SECRET_ACCESS_KEY=***' //:x",
        ),
        // Not secret-looking, or no value: kept.
        ("--action_env=PATH=/usr/bin", "--action_env=PATH=/usr/bin"),
        (
            "--action_env=KEYBOARD_LAYOUT=de",
            "--action_env=KEYBOARD_LAYOUT=de",
        ),
        ("--action_env=GITHUB_TOKEN", "--action_env=GITHUB_TOKEN"),
        (
            "--test_env=GIT_AUTHOR_NAME=Ann",
            "--test_env=GIT_AUTHOR_NAME=Ann",
        ),
    ] {
        assert_eq!(redacted(input), want, "input {input:?}");
    }
}

#[test]
fn console_headers_and_assignments() {
    for (input, want) in [
        (
            "curl -H 'PRIVATE-TOKEN: glpat-abc' https://gitlab.example/api",
            "curl -H 'PRIVATE-TOKEN: *********' https://gitlab.example/api",
        ),
        (
            "curl -H \"X-Auth-Token: abc123\" url",
            "curl -H \"X-Auth-Token: ******\" url",
        ),
        ("password=hunter2 next", "password=******* next"),
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7",
            "aws_secret_access_key = ****************",
        ),
        (
            "+ export GITHUB_TOKEN=ghp_xyz",
            "+ export GITHUB_TOKEN=*******",
        ),
        (
            "NPM_TOKEN=\"a b\" npm publish",
            "NPM_TOKEN=\"***\" npm publish",
        ),
        ("declare -x SECRET_KEY='s3'", "declare -x SECRET_KEY='**'"),
        (
            "{\"password\":\"pw\",\"user\":\"ann\"}",
            "{\"password\":\"**\",\"user\":\"ann\"}",
        ),
        ("--github_token=abc --jobs=4", "--github_token=*** --jobs=4"),
        (
            "GET /x?access_token=abc&page=2",
            "GET /x?access_token=***&page=2",
        ),
        ("a=1 CI_JOB_TOKEN=xyz b=2", "a=1 CI_JOB_TOKEN=*** b=2"),
    ] {
        assert_eq!(redacted(input), want, "input {input:?}");
    }
}

#[test]
fn google_credentials_json_is_masked_whole() {
    let json = "{\"type\": \"service_account\", \"private_key\": \"-----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END PRIVATE KEY-----\\n\", \"x\": \"}\"}";
    let input = format!("--google_credentials_json={json} //:target");
    let want = format!(
        "--google_credentials_json={} //:target",
        "*".repeat(json.len())
    );
    assert_eq!(redacted(&input), want);
    // Across lines, and unquoted non-JSON to the end of the line.
    assert_eq!(
        redacted("--google_credentials_json={\n \"k\": \"v\"\n} after"),
        "--google_credentials_json=*\n*********\n* after"
    );
    assert_eq!(
        redacted("--google_credentials_json=abc def\nnext"),
        "--google_credentials_json=*******\nnext"
    );
}

#[test]
fn format_characters_do_not_hide_a_keyword() {
    for (input, want) in [
        ("Bear\u{200b}er tok123", "Bear\u{200b}er ******"),
        (
            "Author\u{ad}ization: Basic dXNlcjpw",
            "Author\u{ad}ization: Basic ********",
        ),
        ("GITHUB_TO\u{2060}KEN=abc", "GITHUB_TO\u{2060}KEN=***"),
        (
            "--bes\u{200d}_header=x-api-key=v",
            "--bes\u{200d}_header=x-api-key=*",
        ),
        (
            "--action_env=NPM_\u{feff}TOKEN=a",
            "--action_env=NPM_\u{feff}TOKEN=*",
        ),
    ] {
        assert_eq!(redacted(input), want, "input {input:?}");
    }
    // A format character inside the secret is masked with it, whole.
    let input = "Bearer ab\u{200b}cd";
    let out = redacted(input);
    assert_eq!(out.len(), input.len());
    assert_eq!(out, format!("Bearer {}", "*".repeat(2 + 3 + 2)));
}

#[test]
fn text_that_only_looks_close_is_kept() {
    for input in [
        "Target //tools/auth:token_lib up-to-date:",
        "bazel-bin/auth/key: 3 files",
        "src/auth/token.rs: warning: unused import",
        "KEYBOARD_LAYOUT=de",
        "GIT_AUTHOR_NAME=Ann Example",
        "TOKENIZERS_PARALLELISM=false",
        "if token == other { }",
        "INFO: Build completed successfully, 3 total actions",
        "--jobs=8 --bes_backend=grpcs://bes.example --keep_going",
        "author: Ann",
        "https://example.com/a?page=2",
        "keyboard: us",
    ] {
        assert_eq!(redacted(input), input, "input {input:?}");
    }
}

#[test]
fn flag_values_in_structured_options_and_the_next_argument() {
    // Option { combined_form=1, option_name=2, option_value=3 }
    let option = |name: &str, value: &str| {
        cat(&[
            ld(1, format!("--{name}={value}").as_bytes()),
            ld(2, name.as_bytes()),
            ld(3, value.as_bytes()),
        ])
    };
    let list = ld(
        1,
        &cat(&[
            ld(1, &option("action_env", "GITHUB_TOKEN=abc def")),
            ld(1, &option("action_env", "PATH=/usr/bin")),
            ld(1, &option("google_credentials_json", "{\"k\": \"v\"}")),
        ]),
    );
    // An unstructured command line: `--test_env NPM_TOKEN=x`, `--google_credentials_json {...}`.
    let args = ld(
        12,
        &cat(&[
            ld(1, b"--test_env"),
            ld(1, b"NPM_TOKEN=x y"),
            ld(1, b"--test_env"),
            ld(1, b"HOME=/home/me"),
            ld(1, b"--google_credentials_json"),
            ld(1, b"{\"k\": 1}"),
            ld(1, b"//:all"),
        ]),
    );
    let before = cat(&[list, args]);
    let mut after = before.clone();
    redact_message(&mut after);
    only_masked(&before, &after);
    let text = String::from_utf8_lossy(&after);
    for secret in ["abc", "def", "\"v\"", "NPM_TOKEN=x", "{\"k"] {
        assert!(!text.contains(secret), "{secret} left in {text:?}");
    }
    for kept in [
        "GITHUB_TOKEN=*******",
        "PATH=/usr/bin",
        "NPM_TOKEN=***",
        "HOME=/home/me",
        "//:all",
        "--google_credentials_json=********",
    ] {
        assert!(text.contains(kept), "{kept} not in {text:?}");
    }
}

#[test]
fn malformed_input_is_left_alone_and_never_panics() {
    for input in [
        vec![0x0a, 0xff],
        vec![0x0a, 0x05, b'a'],
        vec![0xff; 11],
        vec![],
        vec![0x0b, 0x00],
    ] {
        let mut b = input.clone();
        redact_message(&mut b);
        assert_eq!(b, input);
    }
}
