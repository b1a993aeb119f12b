//! Reading policy files: the YAML model (serde), its validation with file, line and
//! key path in every error, and compiling it into a [`Policy`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::compile::{Fnv1a, InstancePattern, Matcher};
use super::{
    show_key, Condition, Entry, Field, MatchMode, Policy, PolicyError, PolicyOptions, Rule, Rules,
    Verdict,
};

/// The top-level key reserved for file-wide settings.
pub(super) const META_KEY: &str = "gridgate";

/// One policy file's text and names.
pub(super) struct Source {
    /// The path it was read from (`None` for [`Policy::from_yaml`]).
    pub path: Option<PathBuf>,
    /// The name used in errors and locators: the path as given, or the origin.
    pub display: String,
    /// The file name alone, used in decision reasons (`team-a.yaml`).
    pub short: String,
    pub text: String,
}

impl Source {
    pub(super) fn text(origin: &str, text: &str) -> Source {
        let short = Path::new(origin)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| origin.to_string());
        Source {
            path: None,
            display: origin.to_string(),
            short,
            text: text.to_string(),
        }
    }
}

/// Reads a policy file, or every `*.yaml` / `*.yml` file of a directory (sorted by name,
/// not recursive, names starting with `.` skipped).
pub(super) fn read_sources(path: &Path) -> Result<Vec<Source>, PolicyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PolicyError::Io { path, source }
    };
    let meta = fs::metadata(path).map_err(io(path))?;
    let files = if meta.is_dir() {
        let mut files = Vec::new();
        for item in fs::read_dir(path).map_err(io(path))? {
            let item = item.map_err(io(path))?;
            let file = item.path();
            let name = item.file_name();
            let name = name.to_string_lossy();
            let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            if yaml && !name.starts_with('.') && file.is_file() {
                files.push(file);
            }
        }
        if files.is_empty() {
            return Err(PolicyError::EmptyDirectory {
                path: path.to_path_buf(),
            });
        }
        files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        files
    } else if meta.is_file() {
        vec![path.to_path_buf()]
    } else {
        // A device or a FIFO: reading `/dev/zero` would never end.
        let source = std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file or a directory",
        );
        return Err(io(path)(source));
    };
    files
        .into_iter()
        .map(|file| {
            let text = fs::read_to_string(&file).map_err(io(&file))?;
            let short = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok(Source {
                display: file.display().to_string(),
                short,
                path: Some(file),
                text,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// The YAML model.

/// One file: optional settings and the entries, in file order.
pub(super) struct RawDocument {
    pub meta: Option<RawMeta>,
    pub entries: Vec<(String, RawEntry)>,
}

/// `gridgate:` at the top of a file.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "file settings: a mapping with `dry-run`"
)]
pub(super) struct RawMeta {
    #[serde(rename = "dry-run", default)]
    pub dry_run: bool,
}

/// `instance: {allow, deny, dry-run}`.
#[derive(Deserialize)]
#[serde(try_from = "RawEntryFields")]
pub(super) struct RawEntry {
    pub allow: Option<RawRules>,
    pub deny: Option<RawRules>,
    pub dry_run: Option<bool>,
    /// The compiled key, when it is a glob.
    pub glob: Option<InstancePattern>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a policy entry: a mapping with `allow` and/or `deny`"
)]
struct RawEntryFields {
    #[serde(default, deserialize_with = "present")]
    allow: Option<RawRules>,
    #[serde(default, deserialize_with = "present")]
    deny: Option<RawRules>,
    #[serde(rename = "dry-run", default, deserialize_with = "present")]
    dry_run: Option<bool>,
}

impl TryFrom<RawEntryFields> for RawEntry {
    type Error = String;

    fn try_from(f: RawEntryFields) -> Result<RawEntry, String> {
        if f.allow.is_none() && f.deny.is_none() {
            return Err("entry has neither `allow` nor `deny`: write `allow: all`, \
                        `allow: [rules]` or `deny: [rules]`"
                .into());
        }
        Ok(RawEntry {
            allow: f.allow,
            deny: f.deny,
            dry_run: f.dry_run,
            glob: None,
        })
    }
}

/// `all`, or a list of rules.
pub(super) enum RawRules {
    All,
    List(Vec<RawRule>),
}

impl<'de> Deserialize<'de> for RawRules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawRules;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`all` or a list of rules")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawRules, E> {
                if s == "all" {
                    Ok(RawRules::All)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(s), &self))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawRules, A::Error> {
                let mut rules = Vec::new();
                while let Some(rule) = seq.next_element()? {
                    rules.push(rule);
                }
                Ok(RawRules::List(rules))
            }
        }
        d.deserialize_any(V)
    }
}

/// One rule. Every condition must hold.
#[derive(Deserialize)]
#[serde(try_from = "RawRuleFields")]
pub(super) struct RawRule {
    pub name: Option<String>,
    pub actor: Option<Pattern>,
    pub subject: Option<Pattern>,
    pub workflow: Option<Pattern>,
    pub requests: Option<Vec<String>>,
    pub claims: Option<Vec<(String, Pattern)>>,
    pub cert: Option<RawCert>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a rule: a mapping with actor, subject, workflow, requests, claims, cert or name"
)]
struct RawRuleFields {
    #[serde(default, deserialize_with = "present")]
    name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    actor: Option<Pattern>,
    #[serde(default, deserialize_with = "present")]
    subject: Option<Pattern>,
    #[serde(default, deserialize_with = "present")]
    workflow: Option<Pattern>,
    #[serde(default, deserialize_with = "present")]
    requests: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    claims: Option<OrderedMap<Pattern>>,
    #[serde(default, deserialize_with = "present")]
    cert: Option<RawCert>,
}

impl TryFrom<RawRuleFields> for RawRule {
    type Error = String;

    fn try_from(f: RawRuleFields) -> Result<RawRule, String> {
        let rule = RawRule {
            name: f.name,
            actor: f.actor,
            subject: f.subject,
            workflow: f.workflow,
            requests: f.requests,
            claims: f.claims.map(|m| m.0),
            cert: f.cert,
        };
        if rule.requests.is_none() && rule.conditions().next().is_none() {
            return Err(
                "rule has no conditions and no `requests`, so it would match \
                        every request: write `allow: all` or `deny: all` to mean that"
                    .into(),
            );
        }
        Ok(rule)
    }
}

impl RawRule {
    /// Every `(key path under the rule, field name for Identity, pattern)`.
    pub(super) fn conditions(&self) -> impl Iterator<Item = (Vec<String>, String, &Pattern)> + '_ {
        let plain = [
            ("actor", &self.actor),
            ("subject", &self.subject),
            ("workflow", &self.workflow),
        ]
        .into_iter()
        .filter_map(|(name, p)| {
            p.as_ref()
                .map(|p| (vec![name.to_string()], name.to_string(), p))
        });
        let claims = self.claims.iter().flatten().map(|(name, p)| {
            (
                vec!["claims".to_string(), name.clone()],
                format!("claim:{name}"),
                p,
            )
        });
        let cert = self.cert.iter().flat_map(|c| c.fields()).map(|(name, p)| {
            (
                vec!["cert".to_string(), name.to_string()],
                format!("cert:{name}"),
                p,
            )
        });
        plain.chain(claims).chain(cert)
    }
}

/// `cert: {subject, cn, dns, uri, email, ip}`.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "certificate conditions: a mapping with subject, cn, dns, uri, email or ip"
)]
pub(super) struct RawCert {
    #[serde(default, deserialize_with = "present")]
    subject: Option<Pattern>,
    #[serde(default, deserialize_with = "present")]
    cn: Option<Pattern>,
    #[serde(default, deserialize_with = "present")]
    dns: Option<Pattern>,
    #[serde(default, deserialize_with = "present")]
    uri: Option<Pattern>,
    #[serde(default, deserialize_with = "present")]
    email: Option<Pattern>,
    #[serde(default, deserialize_with = "present")]
    ip: Option<Pattern>,
}

impl RawCert {
    fn fields(&self) -> impl Iterator<Item = (&'static str, &Pattern)> {
        [
            ("subject", &self.subject),
            ("cn", &self.cn),
            ("dns", &self.dns),
            ("uri", &self.uri),
            ("email", &self.email),
            ("ip", &self.ip),
        ]
        .into_iter()
        .filter_map(|(name, p)| p.as_ref().map(|p| (name, p)))
    }
}

/// A rule pattern as written, checked to be a valid regular expression, with its
/// whole-value matcher already compiled.
pub(super) struct Pattern {
    pub text: String,
    pub whole: Matcher,
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Pattern;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a regular expression")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Pattern, E> {
                // deserialize_str hands over a plain scalar's text as written, so `~`,
                // `null` and an empty value all arrive here.
                if s.is_empty() || matches!(s, "~" | "null" | "Null" | "NULL") {
                    return Err(E::custom(
                        "empty pattern: remove the key to accept any value, or write `.*`",
                    ));
                }
                let whole = Matcher::new(s, MatchMode::Whole).map_err(E::custom)?;
                Ok(Pattern {
                    text: s.to_string(),
                    whole,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// A mapping kept in file order, refusing duplicate keys.
pub(super) struct OrderedMap<T>(pub Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OrderedMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OrderedMap<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut items: Vec<(String, T)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if items.iter().any(|(k, _)| *k == key) {
                        return map.next_value_seed(reject(format!("duplicate key `{key}`")));
                    }
                    let value = map.next_value()?;
                    items.push((key, value));
                }
                Ok(OrderedMap(items))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

impl<'de> Deserialize<'de> for RawDocument {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawDocument;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of instance names to policy entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawDocument, A::Error> {
                let mut doc = RawDocument {
                    meta: None,
                    entries: Vec::new(),
                };
                let mut seen = HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        let what = if key == META_KEY {
                            format!("duplicate `{META_KEY}` settings")
                        } else {
                            format!("duplicate entry for instance `{key}` in this file")
                        };
                        return map.next_value_seed(reject(what));
                    }
                    if key == META_KEY {
                        doc.meta = Some(map.next_value()?);
                    } else {
                        let glob = if InstancePattern::is_glob(&key) {
                            match InstancePattern::new(&key) {
                                Ok(glob) => Some(glob),
                                Err(e) => return map.next_value_seed(reject(e)),
                            }
                        } else {
                            None
                        };
                        let mut entry: RawEntry = map.next_value()?;
                        entry.glob = glob;
                        doc.entries.push((key, entry));
                    }
                }
                Ok(doc)
            }
        }
        d.deserialize_map(V)
    }
}

/// Fails on whatever value comes next, so that the error carries that value's line.
struct Reject<T>(String, PhantomData<T>);

fn reject<T>(message: String) -> Reject<T> {
    Reject(message, PhantomData)
}

impl<'de, T> DeserializeSeed<'de> for Reject<T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T> Visitor<'de> for Reject<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        Err(E::custom(&self.0))
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Err(E::custom(&self.0))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Err(E::custom(&self.0))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<T, E> {
        Err(E::custom(&self.0))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<T, E> {
        Err(E::custom(&self.0))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Err(E::custom(&self.0))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<T, E> {
        Err(E::custom(&self.0))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(de::Error::custom(&self.0))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(de::Error::custom(&self.0))
    }
}

/// For `#[serde(deserialize_with)]` on `Option` fields: a key that is present must hold
/// a value (an explicit `null` is not "absent").
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Parses one file. Errors name the file, line, key path and reason.
pub(super) fn parse(source: &Source) -> Result<RawDocument, PolicyError> {
    let de = serde_yaml_ng::Deserializer::from_str(&source.text);
    match serde_path_to_error::deserialize::<_, Option<RawDocument>>(de) {
        Ok(Some(doc)) if !doc.entries.is_empty() => Ok(doc),
        Ok(_) => Err(PolicyError::Invalid {
            file: source.display.clone(),
            line: None,
            path: String::new(),
            reason: "no instance entries: a policy file maps instance names to \
                     `{allow: ...}` entries"
                .into(),
        }),
        Err(error) => Err(yaml_error(source, &error)),
    }
}

fn yaml_error(
    source: &Source,
    error: &serde_path_to_error::Error<serde_yaml_ng::Error>,
) -> PolicyError {
    let inner = error.inner();
    let location = inner.location();
    let mut reason = inner.to_string();
    if let Some(loc) = &location {
        reason = reason.replace(
            &format!(" at line {} column {}", loc.line(), loc.column()),
            "",
        );
    }
    // serde_yaml_ng puts its own (shorter) key path in front: we give ours.
    let ours = error.path().to_string();
    if let Some((prefix, rest)) = reason.split_once(": ") {
        if !prefix.is_empty() && ours.starts_with(prefix) {
            reason = rest.to_string();
        }
    }
    PolicyError::Invalid {
        file: source.display.clone(),
        line: location.map(|l| l.line()),
        path: format_path(error.path()),
        reason,
    }
}

/// `team-a.allow[1].actor`, with odd keys quoted.
fn format_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&show_key(key));
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Compiling.

/// Parses and compiles every source into one policy; also returns the parsed files,
/// for `check`.
pub(super) fn build(
    sources: &[Source],
    opts: &PolicyOptions,
) -> Result<(Policy, Vec<RawDocument>), PolicyError> {
    let mut hash = Fnv1a::new();
    let mut docs = Vec::with_capacity(sources.len());
    let mut entries = Vec::new();
    let mut patterns = Vec::new();
    for source in sources {
        hash.write(source.short.as_bytes());
        hash.write(&[0]);
        hash.write(source.text.as_bytes());
        hash.write(&[0]);
        let doc = parse(source)?;
        let file_dry_run = doc.meta.as_ref().is_some_and(|m| m.dry_run);
        for (key, raw) in &doc.entries {
            let dry_run = raw.dry_run.unwrap_or(file_dry_run);
            let ctx = EntryContext {
                source,
                key,
                dry_run,
                mode: opts.match_mode,
            };
            if let Some(glob) = &raw.glob {
                patterns.push((glob.clone(), entries.len() as u32));
            }
            entries.push(Entry {
                key: key.clone(),
                dry_run,
                allow: ctx.rules(raw.allow.as_ref(), "allow")?,
                deny: ctx.rules(raw.deny.as_ref(), "deny")?,
            });
        }
        docs.push(doc);
    }

    let mut exact: HashMap<Box<str>, Vec<u32>> = HashMap::new();
    for (index, entry) in entries.iter().enumerate() {
        if !InstancePattern::is_glob(&entry.key) {
            exact
                .entry(entry.key.as_str().into())
                .or_default()
                .push(index as u32);
        }
    }
    let exact = exact
        .into_iter()
        .map(|(key, mut indices)| {
            indices.extend(
                patterns
                    .iter()
                    .filter(|(p, _)| p.is_match(&key))
                    .map(|(_, i)| *i),
            );
            indices.sort_unstable();
            (key, indices.into_boxed_slice())
        })
        .collect();

    let policy = Policy {
        any_dry_run: entries.iter().any(|e| e.dry_run),
        all_dry_run: entries.iter().all(|e| e.dry_run),
        entries,
        exact,
        patterns,
        version: format!("{:016x}", hash.finish()),
        files: sources.iter().filter_map(|s| s.path.clone()).collect(),
    };
    Ok((policy, docs))
}

struct EntryContext<'a> {
    source: &'a Source,
    key: &'a str,
    dry_run: bool,
    mode: MatchMode,
}

impl EntryContext<'_> {
    fn verdict(&self, list: &str, index: Option<usize>, name: Option<&str>) -> Verdict {
        let key = show_key(self.key);
        let (at, shown) = match index {
            Some(i) => (format!("{list}[{i}]"), format!("{list}[{i}]")),
            None => (list.to_string(), format!("{list}: all")),
        };
        let verb = if list == "allow" { "allowed" } else { "denied" };
        let mut reason = format!("{verb} by {}: {key} {shown}", self.source.short);
        if let Some(name) = name {
            reason.push_str(&format!(" ({name})"));
        }
        if self.dry_run {
            reason.push_str(" [dry-run]");
        }
        Verdict {
            reason: reason.into(),
            locator: format!("{}#{key}.{at}", self.source.display).into(),
        }
    }

    fn rules(&self, raw: Option<&RawRules>, list: &str) -> Result<Rules, PolicyError> {
        Ok(match raw {
            None => Rules::Absent,
            Some(RawRules::All) => Rules::All(self.verdict(list, None, None)),
            Some(RawRules::List(rules)) => Rules::List(
                rules
                    .iter()
                    .enumerate()
                    .map(|(i, rule)| self.rule(rule, list, i))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    fn rule(&self, raw: &RawRule, list: &str, index: usize) -> Result<Rule, PolicyError> {
        let mut conditions = Vec::new();
        for (path, field, pattern) in raw.conditions() {
            let matcher = match self.mode {
                MatchMode::Whole => pattern.whole.clone(),
                MatchMode::Prefix => {
                    Matcher::new(&pattern.text, MatchMode::Prefix).map_err(|reason| {
                        PolicyError::Invalid {
                            file: self.source.display.clone(),
                            line: None,
                            path: format!(
                                "{}.{list}[{index}].{}",
                                show_key(self.key),
                                path.join(".")
                            ),
                            reason,
                        }
                    })?
                }
            };
            let Some(field) = Field::parse(&field) else {
                // The model only produces names Field knows; refuse rather than guess.
                return Err(PolicyError::Invalid {
                    file: self.source.display.clone(),
                    line: None,
                    path: format!("{}.{list}[{index}]", show_key(self.key)),
                    reason: format!("unsupported field `{field}`"),
                });
            };
            conditions.push(Condition { field, matcher });
        }
        Ok(Rule {
            requests: raw
                .requests
                .as_ref()
                .map(|r| r.iter().map(|name| name.as_str().into()).collect()),
            conditions: conditions.into_boxed_slice(),
            verdict: self.verdict(list, Some(index), raw.name.as_deref()),
        })
    }
}
