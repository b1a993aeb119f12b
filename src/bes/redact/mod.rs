//! Credential redaction for build events, applied before an event is stored
//! so that no query ever returns a token.
//!
//! Bazel puts its command line into the event stream (`unstructured_command_line`,
//! `structured_command_line`, `options_parsed` inside the `bazel_event` Any
//! payload), and with it values such as `--remote_header=Authorization=Bearer …`,
//! `--bes_header=…`, `--action_env=GITHUB_TOKEN=…` or
//! `--remote_cache=grpcs://user:pass@…`; console output may echo them, and
//! scripts print their own (`export NPM_TOKEN=…`, `PRIVATE-TOKEN: …`). Bazel's
//! `build_event_stream` proto is not ours, so the payload is treated as an
//! opaque protobuf: [`redact_message`] walks the wire format, finds string and
//! bytes fields (recursing into fields that parse as nested messages), and
//! overwrites each secret **in place** with the same number of `*` bytes.
//! Lengths never change, so every length prefix stays valid and every other
//! byte of the event is kept; a redacted string stays valid UTF-8 because only
//! whole characters are replaced.
//!
//! Text is matched after removing the Unicode format characters (category
//! Cf: zero-width space and joiners U+200B..U+200F, U+2060..U+2064, the BOM
//! U+FEFF, the soft hyphen U+00AD, ...), so `Bear\u{200b}er` is still
//! `Bearer`; what is masked is the original text, format characters included.
//!
//! A **secret-looking name** (of a variable, a header, a key or a flag) is one
//! with a word that ends in `TOKEN`, `SECRET`, `PASSWORD`, `PASSWD`,
//! `CREDENTIAL`, `KEY`, `AUTH`, `AUTHORIZATION` or `COOKIE` (each also with a
//! final `S`), or a word that is `PASS` or `PAT`, in any case. Words are split
//! at every character other than a letter and at a lower-to-upper case change:
//! `GITHUB_TOKEN`, `npm_auth`, `APIKEY`, `apiKey`, `aws_secret_access_key` and
//! `X-Auth-Token` look secret; `KEYBOARD_LAYOUT`, `GIT_AUTHOR_NAME` and
//! `TOKENIZERS_PARALLELISM` do not.
//!
//! What counts as a secret:
//! - the header value of `--remote_header=`, `--bes_header=`,
//!   `--remote_cache_header=`, `--remote_exec_header=`, `--remote_downloader_header=`
//!   (the header *name* is kept: `--bes_header=x-api-key=*****`);
//! - the value of `--action_env=`, `--client_env=`, `--repo_env=`,
//!   `--host_action_env=`, `--test_env=` when the variable's name looks
//!   secret (`--action_env=PATH=/usr/bin` stays);
//! - the whole value of `--google_credentials_json=` (a JSON object is masked
//!   to its closing brace, across lines);
//!   for all three kinds of flag also in the two-argument form (`--bes_header`
//!   `x-api-key=…`) and in a structured option whose name is the flag; the
//!   value runs to the end of the line (or the closing quote when the flag
//!   was quoted);
//! - the value of any assignment to a secret-looking name: `NAME=value`,
//!   `NAME = value`, `export NAME=value`, `--name=value`, `NAME: value` (a
//!   colon needs a space after it, so that Bazel labels such as `//auth:lib`
//!   are left alone, unless the name is quoted as in JSON; a name right after
//!   `/` ends a path, as in `src/auth/token.rs: warning`) up to a space,
//!   quote, `,`, `;` or `&`, or a whole quoted value;
//! - the credential after `authorization` / `proxy-authorization` (`=` or `:`,
//!   any case, with or without a scheme such as `Bearer`), anything after `Bearer `,
//!   and `x-api-key` / `api_key` style values;
//! - the user-info part of a URL (`scheme://user:password@host` becomes
//!   `scheme://*************@host`).

use std::borrow::Cow;
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

/// The Bazel flags whose values are `NAME=VALUE` environment variables.
const ENV_FLAGS: &[&str] = &[
    "action_env",
    "client_env",
    "repo_env",
    "host_action_env",
    "test_env",
];

/// The Bazel flags whose whole value is a credential.
const CREDENTIAL_FLAGS: &[&str] = &["google_credentials_json"];

/// Name words that end like these (or like these plus `S`) look secret.
const SECRET_WORD_ENDINGS: &[&[u8]] = &[
    b"TOKEN",
    b"SECRET",
    b"PASSWORD",
    b"PASSWD",
    b"CREDENTIAL",
    b"KEY",
    b"AUTH",
    b"AUTHORIZATION",
    b"COOKIE",
];

/// Name words that look secret only as they are.
const SECRET_WORDS: &[&[u8]] = &[b"PASS", b"PAT"];

/// How deep nested messages are followed.
const MAX_DEPTH: usize = 64;

/// The byte written over secrets.
const MASK: u8 = b'*';

/// The kinds of Bazel flag whose value is (or may hold) a secret.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FlagKind {
    /// `HEADER=VALUE`: the value is masked, the header name kept.
    Header,
    /// `NAME=VALUE`: the value is masked when the name looks secret.
    Env,
    /// The whole value is masked.
    Credential,
}

impl FlagKind {
    /// The kind of a bare flag name (`bes_header`, `action_env`, ...).
    fn of(name: &[u8]) -> Option<FlagKind> {
        let is = |flags: &[&str]| flags.iter().any(|f| name == f.as_bytes());
        if is(HEADER_FLAGS) {
            Some(FlagKind::Header)
        } else if is(ENV_FLAGS) {
            Some(FlagKind::Env)
        } else if is(CREDENTIAL_FLAGS) {
            Some(FlagKind::Credential)
        } else {
            None
        }
    }

    /// The part of a flag's value (the whole argument) that is secret.
    fn secret_in(self, value: &[u8]) -> Option<Range<usize>> {
        let after_eq = value.iter().position(|&b| b == b'=').map(|p| p + 1);
        let range = match self {
            FlagKind::Header => after_eq.unwrap_or(0)..value.len(),
            FlagKind::Env => {
                let start = after_eq?;
                if !secret_name(&value[..start - 1]) {
                    return None;
                }
                start..value.len()
            }
            FlagKind::Credential => 0..value.len(),
        };
        (!range.is_empty()).then_some(range)
    }
}

struct Patterns {
    /// Format characters (Unicode category Cf), removed before matching.
    format: Regex,
    /// Cheap first pass: a value none of whose bytes match this holds no
    /// secret any rule below finds (each rule needs one of these words).
    prefilter: Regex,
    /// `--remote_header=`, `--action_env=`, ... (any flag of a [`FlagKind`]).
    value_flag: Regex,
    /// A header name after a header flag (`Authorization=`).
    header_name: Regex,
    /// Credentials after an authorization or API-key header name.
    auth: Regex,
    /// Anything after `Bearer `.
    bearer: Regex,
    /// `scheme://userinfo@`.
    userinfo: Regex,
}

static PATTERNS: LazyLock<Patterns> = LazyLock::new(|| {
    let flags = [HEADER_FLAGS, ENV_FLAGS, CREDENTIAL_FLAGS]
        .concat()
        .join("|");
    // The patterns are constants; a failure here is a bug caught by the unit tests.
    let re = |p: &str| Regex::new(p).unwrap_or_else(|e| panic!("redaction pattern {p:?}: {e}"));
    Patterns {
        format: re(r"\p{Cf}+"),
        prefilter: re(
            r"(?i)_header|_env|authoriz|api[-_]?key|bearer|://|token|secret|passw|credential|key|auth|cookie|pass|pat",
        ),
        value_flag: re(&format!(r#"(?i)(?P<q>['"]?)--(?P<flag>{flags})="#)),
        header_name: re(r"\A[A-Za-z0-9_\-.]+[=:]"),
        auth: re(
            r#"(?i)\b(?:proxy-)?(?:authorization|x-buildbuddy-api-key|x-api-key|api[-_]key)['"]?\s*[:=]\s*['"]?(?:(?:bearer|basic|token|digest|negotiate)\s+)?(?P<s>[^\s'",;&]+)"#,
        ),
        bearer: re(r#"(?i)\bbearer\s+(?P<s>[^\s'",;&]+)"#),
        userinfo: re(r#"(?i)\b[a-z][a-z0-9+.\-]*://(?P<s>[^\s/@?#'"]+)@"#),
    }
});

/// Whether a variable, header, key or flag name looks like it names a secret
/// (see the module documentation for the rule).
fn secret_name(name: &[u8]) -> bool {
    words(name).any(|word| {
        let word = word.to_ascii_uppercase();
        let stem = word.strip_suffix(b"S").unwrap_or(&word);
        SECRET_WORDS.contains(&word.as_slice())
            || SECRET_WORD_ENDINGS
                .iter()
                .any(|end| word.ends_with(end) || stem.ends_with(end))
    })
}

/// The words of a name: runs of ASCII letters, split where a lower-case
/// letter is followed by an upper-case one.
fn words(name: &[u8]) -> impl Iterator<Item = &[u8]> {
    name.split(|b| !b.is_ascii_alphabetic()).flat_map(|run| {
        let mut cuts = vec![0];
        cuts.extend(
            (1..run.len())
                .filter(|&i| run[i - 1].is_ascii_lowercase() && run[i].is_ascii_uppercase()),
        );
        cuts.push(run.len());
        (0..cuts.len() - 1)
            .map(move |i| &run[cuts[i]..cuts[i + 1]])
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
    })
}

/// Text with its format characters removed, and where each of its bytes
/// came from in the original.
struct Normalized<'a> {
    text: Cow<'a, [u8]>,
    /// For each byte of `text`, its index in the original (`None`: the same).
    origin: Option<Vec<usize>>,
}

impl<'a> Normalized<'a> {
    fn new(s: &'a [u8]) -> Normalized<'a> {
        let format = &PATTERNS.format;
        if s.is_ascii() || !format.is_match(s) {
            return Normalized {
                text: Cow::Borrowed(s),
                origin: None,
            };
        }
        let mut text = Vec::with_capacity(s.len());
        let mut origin = Vec::with_capacity(s.len());
        let mut at = 0;
        for m in format.find_iter(s) {
            text.extend_from_slice(&s[at..m.start()]);
            origin.extend(at..m.start());
            at = m.end();
        }
        text.extend_from_slice(&s[at..]);
        origin.extend(at..s.len());
        Normalized {
            text: Cow::Owned(text),
            origin: Some(origin),
        }
    }

    /// The original bytes of a (non-empty) range of `text`, format
    /// characters inside it included.
    fn original(&self, r: Range<usize>) -> Range<usize> {
        match &self.origin {
            None => r,
            Some(origin) => origin[r.start]..origin[r.end - 1] + 1,
        }
    }
}

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
    // the other strings of the message are that flag's values.
    let option_context = leaves
        .iter()
        .filter(|(_, l)| *l == Leaf::Text)
        .find_map(|(r, _)| FlagKind::of(&Normalized::new(&buf[r.clone()]).text));
    let mut value_follows: Option<FlagKind> = None;
    for (range, leaf) in &leaves {
        match leaf {
            Leaf::Message => count += walk(&mut buf[range.clone()], depth + 1),
            Leaf::Text | Leaf::Bytes => {
                let s = Normalized::new(&buf[range.clone()]);
                let flag = s.text.strip_prefix(b"--").and_then(FlagKind::of);
                let value_of = match leaf {
                    Leaf::Text if FlagKind::of(&s.text).is_none() && !s.text.starts_with(b"--") => {
                        option_context.or(value_follows)
                    }
                    _ => None,
                };
                let secret = value_of
                    .and_then(|kind| kind.secret_in(&s.text))
                    .map(|r| s.original(r));
                // The next argument after a bare `--bes_header` is its value.
                value_follows = if *leaf == Leaf::Text { flag } else { None };
                if let Some(r) = secret {
                    let value = &mut buf[range.clone()][r];
                    if !value.iter().all(|&b| b == MASK) {
                        mask(value);
                        count += 1;
                    }
                }
                count += redact_text(&mut buf[range.clone()]);
            }
        }
    }
    count
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
fn secret_ranges(original: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let p = &*PATTERNS;
    if original.len() < 6 {
        return out;
    }
    let normalized = Normalized::new(original);
    let s: &[u8] = &normalized.text;
    if !p.prefilter.is_match(s) {
        return out;
    }
    flag_values(s, &mut out);
    assignments(s, &mut out);
    for re in [&p.auth, &p.bearer, &p.userinfo] {
        for c in re.captures_iter(s) {
            if let Some(m) = c.name("s") {
                out.push(m.range());
            }
        }
    }
    // Back to the original's bytes; merge overlaps so each secret counts once.
    let mut out: Vec<Range<usize>> = out
        .into_iter()
        .filter(|r| !r.is_empty())
        .map(|r| normalized.original(r))
        .collect();
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

/// The secret values of `--FLAG=` for the flags of a [`FlagKind`]: to the end
/// of the line, or to the closing quote when the flag was quoted.
fn flag_values(s: &[u8], out: &mut Vec<Range<usize>>) {
    let p = &*PATTERNS;
    for c in p.value_flag.captures_iter(s) {
        let (Some(m), Some(flag)) = (c.get(0), c.name("flag")) else {
            continue;
        };
        let Some(kind) = FlagKind::of(&flag.as_bytes().to_ascii_lowercase()) else {
            continue;
        };
        let quote = c.get(1).and_then(|q| q.as_bytes().first().copied());
        let start = m.end();
        let end = s[start..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r' || Some(b) == quote)
            .map_or(s.len(), |p| start + p);
        let value = &s[start..end];
        let secret = match kind {
            FlagKind::Header => {
                let name = p.header_name.find(value).map_or(0, |n| n.end());
                Some(name..value.len())
            }
            FlagKind::Env => kind.secret_in(value),
            FlagKind::Credential if value.first() == Some(&b'{') => {
                // A JSON object may span lines: mask it to its closing brace.
                Some(0..json_object_len(&s[start..]))
            }
            FlagKind::Credential => kind.secret_in(value),
        };
        if let Some(r) = secret {
            out.push(start + r.start..start + r.end);
        }
    }
}

/// The length of the JSON object at the start of `s` (to its closing brace,
/// strings and escapes respected), or all of `s` when it does not close.
fn json_object_len(s: &[u8]) -> usize {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in s.iter().enumerate() {
        match (in_string, b) {
            (true, _) if escaped => escaped = false,
            (true, b'\\') => escaped = true,
            (true, b'"') => in_string = false,
            (true, _) => {}
            (false, b'"') => in_string = true,
            (false, b'{') => depth += 1,
            (false, b'}') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    s.len()
}

/// The values assigned to secret-looking names: `NAME=value`, `NAME = value`,
/// `NAME: value` (a space after the colon, or a quoted name), quoted values
/// whole. A name right after `/` is the end of a path, not a name.
fn assignments(s: &[u8], out: &mut Vec<Range<usize>>) {
    let is_name = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-');
    // Values already taken: separators inside them are not assignments.
    let mut taken = 0;
    for sep in 0..s.len() {
        if sep < taken || !matches!(s[sep], b'=' | b':') {
            continue;
        }
        // Back from the separator: blanks, an optional closing quote, the name.
        let mut name_end = sep;
        while name_end > 0 && matches!(s[name_end - 1], b' ' | b'\t') {
            name_end -= 1;
        }
        let quoted_name = name_end > 0 && matches!(s[name_end - 1], b'"' | b'\'');
        if quoted_name {
            name_end -= 1;
        }
        let mut name_start = name_end;
        while name_start > 0 && is_name(s[name_start - 1]) {
            name_start -= 1;
        }
        if name_start == name_end {
            continue;
        }
        let next = s.get(sep + 1).copied();
        let separated = match (s[sep], next) {
            (b':', Some(b' ' | b'\t')) => true,
            (b':', _) => quoted_name,
            // `==` and `=>` are operators, not assignments.
            (_, Some(b'=' | b'>')) => false,
            _ => true,
        };
        // A name right after a slash ends a path (`src/auth/token.rs: ...`).
        let in_path = name_start > 0 && matches!(s[name_start - 1], b'/' | b'\\');
        if !separated || in_path || !secret_name(&s[name_start..name_end]) {
            continue;
        }
        let mut v = sep + 1;
        while matches!(s.get(v), Some(b' ' | b'\t')) {
            v += 1;
        }
        let quote = match s.get(v) {
            Some(&q @ (b'"' | b'\'')) => {
                v += 1;
                Some(q)
            }
            _ => None,
        };
        // `Authorization: Bearer x`: the scheme is not the secret.
        let rest = &s[v..];
        for scheme in ["bearer", "basic", "token", "digest", "negotiate"] {
            let n = scheme.len();
            if rest.len() > n
                && rest[..n].eq_ignore_ascii_case(scheme.as_bytes())
                && matches!(rest[n], b' ' | b'\t')
            {
                v += n;
                while matches!(s.get(v), Some(b' ' | b'\t')) {
                    v += 1;
                }
                break;
            }
        }
        let ends_value = |b: u8| match quote {
            Some(q) => b == q || b == b'\n',
            None => b.is_ascii_whitespace() || b"'\",;&".contains(&b),
        };
        let end = s[v..]
            .iter()
            .position(|&b| ends_value(b))
            .map_or(s.len(), |p| v + p);
        out.push(v..end);
        taken = end;
    }
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
mod tests;
