//! Turning pattern texts into matchers: rule patterns (regular expressions, anchored per
//! [`MatchMode`]) and instance-name globs.

use regex::{Regex, RegexBuilder};

use super::MatchMode;

/// The most memory one compiled pattern may use. Ordinary ACL patterns need a few
/// kilobytes; Unicode classes with counted repetition are big (`\w{1,64}` about 3 MiB,
/// `(?-u:\w){1,64}` 9 KiB); `(\w{100}){100}` (500 MiB) and the like are refused
/// instead of eating memory.
pub(super) const SIZE_LIMIT: usize = 8 << 20;

/// The most memory one pattern's lazy DFA may cache (per thread using it); past it the
/// regex crate falls back to slower engines, never to unbounded memory.
const DFA_CACHE_LIMIT: usize = 1 << 20;

/// A compiled rule pattern.
#[derive(Debug, Clone)]
pub(super) enum Matcher {
    /// A pattern without regex syntax, whole-value mode: plain equality.
    Equals(Box<str>),
    /// A pattern without regex syntax, prefix mode: `starts_with`.
    StartsWith(Box<str>),
    /// Anything else.
    Regex(Regex),
}

impl Matcher {
    /// Compiles `pattern` for `mode`. The error is the reason, ready for a message.
    pub(super) fn new(pattern: &str, mode: MatchMode) -> Result<Matcher, String> {
        if let Some((text, anchored_end)) = literal(pattern) {
            return Ok(match (mode, anchored_end) {
                (MatchMode::Whole, _) | (MatchMode::Prefix, true) => Matcher::Equals(text.into()),
                (MatchMode::Prefix, false) => Matcher::StartsWith(text.into()),
            });
        }
        compile_anchored(pattern, mode).map(Matcher::Regex)
    }

    pub(super) fn is_match(&self, value: &str) -> bool {
        match self {
            Matcher::Equals(text) => value == &**text,
            Matcher::StartsWith(text) => value.starts_with(&**text),
            Matcher::Regex(regex) => regex.is_match(value),
        }
    }
}

/// The text a pattern stands for when it is a plain string: no regex syntax besides a
/// leading `^`, a trailing `$` and escaped punctuation (`\.`, `\-`, `\/`, ...). Returns the
/// text and whether the pattern ended in `$`. `None` for anything else.
pub(super) fn literal(pattern: &str) -> Option<(String, bool)> {
    let body = pattern.strip_prefix('^').unwrap_or(pattern);
    let (body, anchored_end) = match body.strip_suffix('$') {
        // `\$` is an escaped dollar, part of the text, not an anchor.
        Some(rest) if !ends_with_escape(rest) => (rest, true),
        _ => (body, false),
    };
    let mut text = String::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e) if e.is_ascii_punctuation() => text.push(e),
                _ => return None,
            },
            '.' | '+' | '*' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^' | '$' => {
                return None
            }
            // Whitespace and `#` mean something under `(?x)`, which needs `(` anyway.
            c => text.push(c),
        }
    }
    Some((text, anchored_end))
}

/// Whether `text` ends in an odd number of backslashes (so its next character is escaped).
fn ends_with_escape(text: &str) -> bool {
    text.chars().rev().take_while(|&c| c == '\\').count() % 2 == 1
}

fn build(source: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(source)
        .size_limit(SIZE_LIMIT)
        .dfa_size_limit(DFA_CACHE_LIMIT)
        .build()
}

/// Compiles `^(?:pattern)$` (whole) or `^(?:pattern)` (prefix).
fn compile_anchored(pattern: &str, mode: MatchMode) -> Result<Regex, String> {
    let close = match mode {
        MatchMode::Whole => ")$",
        MatchMode::Prefix => ")",
    };
    match build(&format!("^(?:{pattern}{close}")) {
        Ok(regex) => Ok(regex),
        Err(wrapped) => {
            // Report errors against the pattern as written, not our wrapper.
            if let Err(raw) = build(pattern) {
                return Err(describe(pattern, &raw));
            }
            // The pattern alone is fine, so the wrapper broke it: the `(?x)` flag is on
            // at its end and a `# comment` swallowed the closing `)`. In that mode a
            // newline ends the comment and is itself ignored.
            build(&format!("^(?:{pattern}\n{close}")).map_err(|_| describe(pattern, &wrapped))
        }
    }
}

/// `invalid regex `(x`: unclosed group` on one line.
fn describe(pattern: &str, error: &regex::Error) -> String {
    let shown = shorten(pattern);
    match error {
        regex::Error::CompiledTooBig(limit) => {
            format!("regex `{shown}` is too large (it compiles to more than {limit} bytes)")
        }
        other => {
            let text = other.to_string();
            let last = text
                .lines()
                .rev()
                .find_map(|line| line.strip_prefix("error: "))
                .unwrap_or_else(|| text.lines().last().unwrap_or(""));
            format!("invalid regex `{shown}`: {last}")
        }
    }
}

/// At most 80 characters of a pattern, for messages.
pub(super) fn shorten(text: &str) -> String {
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// An instance-name glob: `*` matches within one `/` segment, `**` matches anything
/// (including `/`), every other character means itself. Always the whole name.
#[derive(Debug, Clone)]
pub(super) struct InstancePattern(Regex);

impl InstancePattern {
    /// Whether a top-level key is a glob rather than an instance name.
    pub(super) fn is_glob(key: &str) -> bool {
        key.contains('*')
    }

    pub(super) fn new(glob: &str) -> Result<InstancePattern, String> {
        let mut source = String::from("(?s)^");
        let mut rest = glob;
        while let Some(star) = rest.find('*') {
            source.push_str(&regex::escape(&rest[..star]));
            rest = &rest[star..];
            if rest.starts_with("**") {
                source.push_str(".*");
                rest = &rest[2..];
            } else {
                source.push_str("[^/]*");
                rest = &rest[1..];
            }
        }
        source.push_str(&regex::escape(rest));
        source.push('$');
        build(&source)
            .map(InstancePattern)
            .map_err(|e| format!("instance pattern `{}`: {e}", shorten(glob)))
    }

    pub(super) fn is_match(&self, instance: &str) -> bool {
        self.0.is_match(instance)
    }
}

/// FNV-1a, 64 bits: a tiny hash whose value never changes between Rust versions.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fnv1a(u64);

impl Fnv1a {
    pub(super) fn new() -> Fnv1a {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    pub(super) fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub(super) fn finish(self) -> u64 {
        self.0
    }
}

/// How a pattern's meaning depends on [`MatchMode`], for `check`.
///
/// Returns `true` when `^(?:p)` and `^(?:p)$` admit the same values: the pattern has no
/// top-level `|` and ends in `$`, `\z`, or `.*` / `.+` (lazy or not). Conservative: a
/// `false` means "may differ".
pub(super) fn same_in_both_modes(pattern: &str) -> bool {
    let chars: Vec<char> = pattern.chars().collect();
    let mut depth = 0usize;
    let mut class = 0usize;
    let mut i = 0;
    // Index of the last character that is syntax, not escaped or inside a class.
    let mut escaped_at = vec![false; chars.len()];
    let mut in_class_at = vec![false; chars.len()];
    while i < chars.len() {
        let c = chars[i];
        in_class_at[i] = class > 0;
        if c == '\\' {
            if i + 1 < chars.len() {
                escaped_at[i + 1] = true;
                in_class_at[i + 1] = class > 0;
            }
            i += 2;
            continue;
        }
        match c {
            '[' => class += 1,
            ']' if class > 0 => class -= 1,
            '(' if class == 0 => depth += 1,
            ')' if class == 0 => depth = depth.saturating_sub(1),
            '|' if class == 0 && depth == 0 => return false,
            _ => {}
        }
        i += 1;
    }
    let syntax = |i: usize, want: char| chars[i] == want && !escaped_at[i] && !in_class_at[i];
    let n = chars.len();
    if n >= 1 && syntax(n - 1, '$') {
        return true;
    }
    if n >= 2 && chars[n - 1] == 'z' && escaped_at[n - 1] {
        return true;
    }
    // `.*`, `.+`, `.*?`, `.+?`
    let end = if n >= 1 && syntax(n - 1, '?') {
        n - 1
    } else {
        n
    };
    end >= 2 && (syntax(end - 1, '*') || syntax(end - 1, '+')) && syntax(end - 2, '.')
}

/// Whether the pattern has a `.` that probably should have been `\.`: an unescaped dot
/// outside a class that is not followed by a repetition (`.*`, `.+`, `.?`, `.{`).
pub(super) fn has_bare_dot(pattern: &str) -> bool {
    let chars: Vec<char> = pattern.chars().collect();
    let mut class = 0usize;
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                i += 2;
                continue;
            }
            '[' => class += 1,
            ']' if class > 0 => class -= 1,
            '.' if class == 0 => {
                let next = chars.get(i + 1).copied();
                if !matches!(next, Some('*' | '+' | '?' | '{')) {
                    return true;
                }
            }
            _ => {}
        }
        i += 1;
    }
    false
}
