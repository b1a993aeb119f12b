//! Credential redaction for build events, applied before an event is stored
//! so that no query ever returns a token.
//!
//! Bazel puts its command line into the event stream (`unstructured_command_line`,
//! `structured_command_line`, `options_parsed` inside the `bazel_event` Any
//! payload), and with it values such as `--remote_header=Authorization=Bearer …`,
//! `--bes_header=…` or `--remote_cache=grpcs://user:pass@…`; console output may
//! echo them too. Bazel's `build_event_stream` proto is not ours, so the payload
//! is treated as an opaque protobuf: [`redact_message`] walks the wire format,
//! finds string and bytes fields (recursing into fields that parse as nested
//! messages), and overwrites each secret **in place** with the same number of
//! `*` bytes. Lengths never change, so every length prefix stays valid and every
//! other byte of the event is kept; a redacted string stays valid UTF-8 because
//! only whole characters are replaced.
//!
//! What counts as a secret:
//! - the header value of `--remote_header=`, `--bes_header=`,
//!   `--remote_cache_header=`, `--remote_exec_header=`, `--remote_downloader_header=`
//!   (the header *name* is kept: `--bes_header=x-api-key=*****`), also in the
//!   two-argument form (`--bes_header` `x-api-key=…`) and in a structured
//!   option whose name is one of those flags;
//! - the credential after `authorization` / `proxy-authorization` (`=` or `:`,
//!   any case, with or without a scheme such as `Bearer`), anything after `Bearer `,
//!   and `x-api-key` / `api_key` style values;
//! - the user-info part of a URL (`scheme://user:password@host` becomes
//!   `scheme://*************@host`).

use std::ops::Range;
use std::sync::LazyLock;

use regex::bytes::Regex;

/// The Bazel flags whose values are request headers (and so may hold credentials).
const HEADER_FLAGS: &[&str] = &[
    "remote_header",
    "bes_header",
    "remote_cache_header",
    "remote_exec_header",
    "remote_downloader_header",
];

/// How deep nested messages are followed.
const MAX_DEPTH: usize = 64;

/// The byte written over secrets.
const MASK: u8 = b'*';

struct Patterns {
    /// Cheap first pass: a value none of whose bytes match this holds no
    /// secret any rule below finds (each rule needs one of these words).
    prefilter: Regex,
    /// `--remote_header=NAME=` etc.; the value runs to the end of the line
    /// (or to the closing quote when the flag was quoted).
    header_flag: Regex,
    /// Credentials after an authorization or API-key header name.
    auth: Regex,
    /// Anything after `Bearer `.
    bearer: Regex,
    /// `scheme://userinfo@`.
    userinfo: Regex,
}

static PATTERNS: LazyLock<Patterns> = LazyLock::new(|| {
    let flags = HEADER_FLAGS.join("|");
    // The patterns are constants; a failure here is a bug caught by the unit tests.
    let re = |p: &str| Regex::new(p).unwrap_or_else(|e| panic!("redaction pattern {p:?}: {e}"));
    Patterns {
        prefilter: re(r"(?i)_header|authorization|api[-_]?key|bearer|://"),
        header_flag: re(&format!(
            r#"(?i)(?P<q>['"]?)--(?:{flags})=(?:[A-Za-z0-9_\-.]+[=:])?"#
        )),
        auth: re(
            r#"(?i)\b(?:proxy-)?(?:authorization|x-buildbuddy-api-key|x-api-key|api[-_]key)['"]?\s*[:=]\s*['"]?(?:(?:bearer|basic|token|digest|negotiate)\s+)?(?P<s>[^\s'",;&]+)"#,
        ),
        bearer: re(r#"(?i)\bbearer\s+(?P<s>[^\s'",;&]+)"#),
        userinfo: re(r#"(?i)\b[a-z][a-z0-9+.\-]*://(?P<s>[^\s/@?#'"]+)@"#),
    }
});

/// Redacts credentials inside an encoded protobuf message, in place.
/// Returns how many secrets were overwritten.
pub fn redact_message(buf: &mut [u8]) -> usize {
    walk(buf, 0)
}

/// Redacts credentials in free text (or bytes), in place. Returns how many
/// secrets were overwritten.
pub fn redact_text(buf: &mut [u8]) -> usize {
    let ranges = secret_ranges(buf);
    let n = ranges.len();
    for r in ranges {
        mask(&mut buf[r]);
    }
    n
}

/// One field of a message on the wire.
struct Field {
    wire: u8,
    /// The payload (for length-delimited fields).
    range: Range<usize>,
}

/// What a length-delimited field holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leaf {
    Text,
    Bytes,
    Message,
}

fn walk(buf: &mut [u8], depth: usize) -> usize {
    let Some(fields) = parse_fields(buf) else {
        return 0;
    };
    let leaves: Vec<(Range<usize>, Leaf)> = fields
        .into_iter()
        .filter(|f| f.wire == 2)
        .map(|f| {
            let sub = &buf[f.range.clone()];
            let text = is_text(sub);
            // A nested message whose tags and lengths all happen to be
            // printable (only possible for field 1, tag '\n') still parses;
            // text that parses as a message and starts with a line break is
            // taken as a message, since such text is far rarer.
            let message = depth < MAX_DEPTH
                && !sub.is_empty()
                && (!text || sub[0] == b'\n')
                && parse_fields(sub).is_some();
            let leaf = if message {
                Leaf::Message
            } else if text {
                Leaf::Text
            } else {
                Leaf::Bytes
            };
            (f.range, leaf)
        })
        .collect();

    let mut count = 0;
    // A structured option (name `remote_header`, value `Authorization=…`):
    // the other strings of the message are header values.
    let is_flag_name = |s: &[u8]| HEADER_FLAGS.iter().any(|f| s == f.as_bytes());
    let option_context = leaves
        .iter()
        .any(|(r, l)| *l == Leaf::Text && is_flag_name(&buf[r.clone()]));
    let mut value_follows = false;
    for (range, leaf) in &leaves {
        match leaf {
            Leaf::Message => count += walk(&mut buf[range.clone()], depth + 1),
            Leaf::Text | Leaf::Bytes => {
                let s = &buf[range.clone()];
                let whole_flag = s
                    .strip_prefix(b"--")
                    .is_some_and(|rest| *leaf == Leaf::Text && is_flag_name(rest));
                let header_value = *leaf == Leaf::Text
                    && !is_flag_name(s)
                    && !s.starts_with(b"--")
                    && (option_context || value_follows);
                if header_value {
                    count += mask_header_value(&mut buf[range.clone()]);
                }
                // The next argument after a bare `--bes_header` is its value.
                value_follows = whole_flag;
                count += redact_text(&mut buf[range.clone()]);
            }
        }
    }
    count
}

/// Masks a header value `NAME=VALUE` after the first `=` (the whole string
/// when it has none). Returns 1 when something was masked.
fn mask_header_value(s: &mut [u8]) -> usize {
    let start = s.iter().position(|&b| b == b'=').map_or(0, |p| p + 1);
    if start >= s.len() || s[start..].iter().all(|&b| b == MASK) {
        return 0;
    }
    mask(&mut s[start..]);
    1
}

/// Overwrites bytes with the mask, keeping line breaks.
fn mask(s: &mut [u8]) {
    for b in s {
        if *b != b'\n' && *b != b'\r' {
            *b = MASK;
        }
    }
}

/// The byte ranges of secrets in a text or bytes value.
fn secret_ranges(s: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let p = &*PATTERNS;
    if s.len() < 6 || !p.prefilter.is_match(s) {
        return out;
    }
    for c in p.header_flag.captures_iter(s) {
        let Some(m) = c.get(0) else { continue };
        let quote = c.get(1).and_then(|q| q.as_bytes().first().copied());
        let end = s[m.end()..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r' || Some(b) == quote)
            .map_or(s.len(), |p| m.end() + p);
        if end > m.end() {
            out.push(m.end()..end);
        }
    }
    for re in [&p.auth, &p.bearer, &p.userinfo] {
        for c in re.captures_iter(s) {
            if let Some(m) = c.name("s") {
                out.push(m.range());
            }
        }
    }
    // Merge overlaps so each secret counts once.
    out.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(out.len());
    for r in out {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Whether a value is plausibly text: valid UTF-8 without control characters
/// other than tab and line breaks. Nested messages almost always contain tag
/// or length bytes below 0x20, so they are not mistaken for text.
fn is_text(s: &[u8]) -> bool {
    // ASCII controls are checked byte by byte (fast); C1 controls, rare in
    // both text and messages, are not looked for.
    s.iter()
        .all(|&b| (b >= 0x20 && b != 0x7f) || matches!(b, b'\t' | b'\n' | b'\r'))
        && std::str::from_utf8(s).is_ok()
}

/// Reads a varint at `*pos`, advancing it.
fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Splits a buffer into protobuf fields; `None` unless the whole buffer is a
/// well-formed message (valid tags, no groups, every length in bounds).
fn parse_fields(buf: &[u8]) -> Option<Vec<Field>> {
    let mut fields = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let tag = varint(buf, &mut pos)?;
        let number = tag >> 3;
        if number == 0 || number > (1 << 29) - 1 {
            return None;
        }
        let wire = (tag & 7) as u8;
        let start;
        match wire {
            0 => {
                start = pos;
                varint(buf, &mut pos)?;
            }
            1 => {
                start = pos;
                pos = pos.checked_add(8)?;
            }
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).ok()?;
                start = pos;
                pos = pos.checked_add(len)?;
            }
            5 => {
                start = pos;
                pos = pos.checked_add(4)?;
            }
            _ => return None,
        }
        if pos > buf.len() {
            return None;
        }
        fields.push(Field {
            wire,
            range: start..pos,
        });
    }
    Some(fields)
}

#[cfg(test)]
mod tests {
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
}
