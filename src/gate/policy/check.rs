//! `check`: load a policy and report what deserves a second look.

use std::fmt;
use std::path::Path;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::compile::{has_bare_dot, literal, same_in_both_modes, shorten};
use super::model::{self, RawDocument, RawRules, Source, META_KEY};
use super::{show_key, MatchMode, PolicyError, PolicyOptions, Warning};

/// Loads the policy at `path` exactly as [`super::Policy::load`] does and returns its
/// warnings; an error is what would stop it from loading.
///
/// `known_rpcs` are the RPC names the gateway routes (`FindMissingBlobs`, `Write`, ...);
/// a `requests` entry naming another RPC is a warning, not an error, since upstream
/// services gain RPCs. Pass an empty slice to skip that check.
///
/// Warnings: patterns whose meaning differs between whole and prefix matching; patterns
/// that match an empty value (BuildGrid admits callers without that value there); a `.`
/// that probably means `\.`; unknown RPC names; empty `requests` and `allow` lists;
/// `deny: all`; dry-run entries and files, and a policy in which everything is dry-run.
pub fn check(
    path: &Path,
    opts: &PolicyOptions,
    known_rpcs: &[&str],
) -> Result<Vec<Warning>, PolicyError> {
    let sources = model::read_sources(path)?;
    check_sources(&sources, opts, known_rpcs)
}

pub(super) fn check_sources(
    sources: &[Source],
    opts: &PolicyOptions,
    known_rpcs: &[&str],
) -> Result<Vec<Warning>, PolicyError> {
    let (policy, docs) = model::build(sources, opts)?;
    let mut out = Vec::new();
    for (source, doc) in sources.iter().zip(&docs) {
        let mut found = Vec::new();
        let mut w = Warn {
            source,
            mode: opts.match_mode,
            known_rpcs,
            out: &mut found,
        };
        w.document(doc);
        // In file order (stable: findings on one line keep their order).
        found.sort_by_key(|(line, _)| line.unwrap_or(usize::MAX));
        out.extend(found.into_iter().map(|(_, warning)| warning));
    }
    if policy.all_dry_run {
        if let Some(source) = sources.first() {
            out.push(Warning {
                location: source.display.clone(),
                message: "every entry of the policy is dry-run: it enforces nothing, every \
                          request is allowed and what would be denied is only reported"
                    .into(),
            });
        }
    }
    Ok(out)
}

/// A step of a key path.
#[derive(Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

struct Warn<'a> {
    source: &'a Source,
    mode: MatchMode,
    known_rpcs: &'a [&'a str],
    out: &'a mut Vec<(Option<usize>, Warning)>,
}

impl Warn<'_> {
    fn push(&mut self, path: &[Seg], message: String) {
        let mut location = self.source.display.clone();
        let line = line_of(&self.source.text, path);
        if let Some(line) = line {
            location.push_str(&format!(":{line}"));
        }
        location.push_str(": ");
        location.push_str(&format_path(path));
        self.out.push((line, Warning { location, message }));
    }

    fn document(&mut self, doc: &RawDocument) {
        let file_dry_run = doc.meta.as_ref().is_some_and(|m| m.dry_run);
        if file_dry_run {
            self.push(
                &[key(META_KEY), key("dry-run")],
                "the whole file is dry-run: its denials are only reported, and the instances \
                 it allows are open to every caller (entries with `dry-run: false` excepted)"
                    .into(),
            );
        }
        for (name, entry) in &doc.entries {
            let at = [key(name)];
            let shown = show_key(name);
            if entry.dry_run == Some(true) {
                let message = if entry.allow.is_some() {
                    format!(
                        "dry-run: nothing in this entry is enforced; requests to `{shown}` that \
                         no enforced entry covers are allowed, and its denials only reported"
                    )
                } else {
                    "dry-run: this entry's deny rules are only reported, not enforced".to_string()
                };
                self.push(&[key(name), key("dry-run")], message);
            }
            if let Some(RawRules::List(rules)) = &entry.allow {
                if rules.is_empty() {
                    self.push(
                        &[key(name), key("allow")],
                        format!(
                            "`allow: []` allows nothing: unless another entry allows them, \
                             all requests to `{shown}` are denied"
                        ),
                    );
                }
            }
            if let Some(RawRules::All) = &entry.deny {
                self.push(
                    &[key(name), key("deny")],
                    format!(
                        "`deny: all` denies every request to `{shown}`, whatever any entry allows"
                    ),
                );
            }
            for (list, rules) in [("allow", &entry.allow), ("deny", &entry.deny)] {
                if let Some(RawRules::List(rules)) = rules {
                    for (i, rule) in rules.iter().enumerate() {
                        let mut path = at.to_vec();
                        path.extend([key(list), Seg::Index(i)]);
                        self.rule(&path, rule);
                    }
                }
            }
        }
    }

    fn rule(&mut self, at: &[Seg], rule: &model::RawRule) {
        if let Some(requests) = &rule.requests {
            let mut path = at.to_vec();
            path.push(key("requests"));
            if requests.is_empty() {
                self.push(
                    &path,
                    "empty `requests`: this rule matches no request".into(),
                );
            }
            for (j, name) in requests.iter().enumerate() {
                if self.known_rpcs.is_empty() || self.known_rpcs.contains(&name.as_str()) {
                    continue;
                }
                let hint = self
                    .known_rpcs
                    .iter()
                    .find(|known| known.eq_ignore_ascii_case(name))
                    .map(|known| format!(" (did you mean `{known}`?)"))
                    .unwrap_or_default();
                let mut item = path.clone();
                item.push(Seg::Index(j));
                self.push(
                    &item,
                    format!("unknown RPC `{name}`: the gateway routes no RPC of that name{hint}"),
                );
            }
        }
        for (sub, field, pattern) in rule.conditions() {
            let mut path = at.to_vec();
            path.extend(sub.iter().map(|s| key(s)));
            let text = shorten(&pattern.text);
            let buildgrid_field = matches!(field.as_str(), "actor" | "subject" | "workflow");
            if !same_in_both_modes(&pattern.text) {
                match self.mode {
                    MatchMode::Prefix => {
                        let example = literal(&pattern.text)
                            .map(|(text, _)| format!(" (e.g. `{}-evil`)", shorten(&text)))
                            .unwrap_or_default();
                        self.push(
                            &path,
                            format!(
                                "acl-match is prefix: `{text}` also matches every value that \
                                 merely starts with a match{example}; end it with `$` to match \
                                 whole values"
                            ),
                        )
                    }
                    // Only BuildGrid reads these fields too; claims and cert are ours.
                    MatchMode::Whole if buildgrid_field => self.push(
                        &path,
                        format!(
                            "`{text}` matches whole values here, but only the start of a value \
                             in BuildGrid and with acl-match: prefix; end it with `$` to mean \
                             the same everywhere"
                        ),
                    ),
                    MatchMode::Whole => {}
                }
            }
            if buildgrid_field && pattern.whole.is_match("") {
                let article = if field == "actor" { "an" } else { "a" };
                self.push(
                    &path,
                    format!(
                        "`{text}` matches an empty value: in BuildGrid this rule also admits \
                         callers without {article} {field} (e.g. on unauthenticated instances); \
                         gridgate never matches a missing {field}"
                    ),
                );
            }
            if has_bare_dot(&pattern.text) {
                self.push(
                    &path,
                    format!("`{text}`: `.` matches any character; write `\\.` for a literal dot"),
                );
            }
        }
    }
}

fn format_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&show_key(k));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Finding the line of a key path. The parsed model keeps no positions, but the YAML
// parser puts one on every error: walk the document again and fail on purpose at the
// wanted node (its key, for a mapping entry).

const PROBE: &str = "\u{0}gridgate policy probe";

/// The 1-based line of the node at `path` (of the key, when the last step is a key).
fn line_of(text: &str, path: &[Seg]) -> Option<usize> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    match Probe(path).deserialize(de) {
        Err(e) if e.to_string().contains(PROBE) => e.location().map(|l| l.line()),
        _ => None,
    }
}

struct Probe<'p>(&'p [Seg]);

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Probe<'_> {
    fn leaf<E: de::Error>(&self) -> Result<(), E> {
        if self.0.is_empty() {
            Err(E::custom(PROBE))
        } else {
            Ok(())
        }
    }
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML")
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.leaf()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.leaf()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.leaf()?;
        let Seg::Index(wanted) = self.0[0] else {
            return Ok(());
        };
        let mut i = 0;
        loop {
            let more = if i == wanted {
                seq.next_element_seed(Probe(&self.0[1..]))?.is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more || i >= wanted {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.leaf()?;
        let Seg::Key(wanted) = &self.0[0] else {
            return Ok(());
        };
        let last = self.0.len() == 1;
        while let Some(found) = map.next_key_seed(KeyProbe { wanted, last })? {
            if found {
                return map.next_value_seed(Probe(&self.0[1..]));
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

/// Reads a mapping key; fails (with the key's position) when it is the last step.
struct KeyProbe<'a> {
    wanted: &'a str,
    last: bool,
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyProbe<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        if key == self.wanted && self.last {
            Err(E::custom(PROBE))
        } else {
            Ok(key == self.wanted)
        }
    }
}
