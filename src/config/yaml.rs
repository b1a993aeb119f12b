//! Reading a YAML config document: BuildGrid's tags and variable expansion.
//!
//! BuildGrid configs use YAML tags: `!channel` on each `server:` entry, and the
//! string tags `!expand-path` (`~` and `$VAR`), `!expand-vars` (`$VAR`) and
//! `!read-file` (the file's contents). [`resolve_tags`] turns a parsed document
//! into plain values so the typed model can be deserialized from it. Any other
//! tag is an error that names the key path: an unknown tag is never dropped.

use std::path::Path;

use serde_yaml_ng::{Mapping, Value};

/// Replaces BuildGrid's tags in `value` by what they stand for.
///
/// `path` is the key path of `value` (used in errors); `base` is the directory
/// relative `!read-file` paths are taken from.
pub fn resolve_tags(value: Value, path: &str, base: &Path) -> Result<Value, (String, String)> {
    match value {
        Value::Tagged(tagged) => {
            let tag = tagged.tag.to_string();
            let inner = tagged.value;
            match tag.trim_start_matches('!') {
                "channel" => match inner {
                    Value::Mapping(_) => resolve_tags(inner, path, base),
                    _ => Err((path.to_string(), "!channel must tag a mapping".into())),
                },
                "expand-path" => {
                    let text = scalar_text(&inner, path, &tag)?;
                    Ok(Value::String(expand_vars(&expand_home(&text))))
                }
                "expand-vars" => {
                    let text = scalar_text(&inner, path, &tag)?;
                    Ok(Value::String(expand_vars(&text)))
                }
                "read-file" => {
                    let text = scalar_text(&inner, path, &tag)?;
                    let file = base.join(expand_vars(&expand_home(&text)));
                    read_small_file(&file)
                        .map(|s| Value::String(s.trim().to_string()))
                        .map_err(|e| {
                            (
                                path.to_string(),
                                format!("!read-file {}: {e}", file.display()),
                            )
                        })
                }
                other => Err((
                    path.to_string(),
                    format!(
                        "unknown YAML tag !{other} (gridgate understands !channel, !expand-path, !expand-vars and !read-file)"
                    ),
                )),
            }
        }
        Value::Mapping(map) => {
            let mut out = Mapping::with_capacity(map.len());
            for (k, v) in map {
                let key = match &k {
                    Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                let child = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                let v = resolve_tags(v, &child, base)?;
                out.insert(k, v);
            }
            Ok(Value::Mapping(out))
        }
        Value::Sequence(seq) => seq
            .into_iter()
            .enumerate()
            .map(|(i, v)| resolve_tags(v, &format!("{path}[{i}]"), base))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Sequence),
        other => Ok(other),
    }
}

/// The most `!read-file` reads: it is meant for a secret or a short text.
const MAX_READ_FILE_BYTES: u64 = 1 << 20;

/// Reads a regular file of at most [`MAX_READ_FILE_BYTES`] as UTF-8 text. Anything
/// else is refused before it is opened: `/dev/zero` would be read until memory runs
/// out, a FIFO would block.
fn read_small_file(file: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    if !std::fs::metadata(file)?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(file)?
        .take(MAX_READ_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_READ_FILE_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {MAX_READ_FILE_BYTES} bytes"),
        ));
    }
    String::from_utf8(bytes).map_err(|e| Error::new(ErrorKind::InvalidData, e))
}

fn scalar_text(value: &Value, path: &str, tag: &str) -> Result<String, (String, String)> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err((path.to_string(), format!("{tag} must tag a string"))),
    }
}

/// Expands a leading `~` or `~/` to `$HOME`, as Python's `os.path.expanduser`.
pub fn expand_home(text: &str) -> String {
    if text == "~" || text.starts_with("~/") {
        if let Some(home) = std::env::var_os("HOME") {
            return format!("{}{}", home.to_string_lossy(), &text[1..]);
        }
    }
    text.to_string()
}

/// Expands `$NAME` and `${NAME}` from the environment, as Python's
/// `os.path.expandvars`: an unset variable is left as written.
pub fn expand_vars(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let (name, consumed) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        match (name.is_empty(), std::env::var(name)) {
            (false, Ok(value)) => out.push_str(&value),
            _ => out.push_str(&rest[pos..pos + 1 + consumed]),
        }
        rest = &rest[pos + 1 + consumed..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_set_and_leaves_unset_variables() {
        std::env::set_var("GRIDGATE_TEST_EXPAND", "xyz");
        assert_eq!(expand_vars("a/$GRIDGATE_TEST_EXPAND/b"), "a/xyz/b");
        assert_eq!(expand_vars("${GRIDGATE_TEST_EXPAND}c"), "xyzc");
        assert_eq!(
            expand_vars("$GRIDGATE_TEST_UNSET_VAR/x"),
            "$GRIDGATE_TEST_UNSET_VAR/x"
        );
        assert_eq!(expand_vars("cost $ 5 ${"), "cost $ 5 ${");
    }

    #[test]
    fn channel_tag_is_stripped_and_unknown_tags_fail() {
        let doc: Value =
            serde_yaml_ng::from_str("server:\n  - !channel\n    address: x\n").unwrap();
        let v = resolve_tags(doc, "", Path::new(".")).unwrap();
        assert_eq!(v["server"][0]["address"], Value::String("x".into()));

        let doc: Value = serde_yaml_ng::from_str("a:\n  b: !lru-storage 5\n").unwrap();
        let err = resolve_tags(doc, "", Path::new(".")).unwrap_err();
        assert_eq!(err.0, "a.b");
        assert!(err.1.contains("!lru-storage"), "{}", err.1);
    }

    #[test]
    fn read_file_takes_only_small_regular_files() {
        // Found by fuzzing: `!read-file /dev/zero` read until memory ran out.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), " s3cret \n").unwrap();
        std::fs::write(dir.path().join("big"), vec![b'x'; (1 << 20) + 1]).unwrap();
        let read = |name: &str| {
            let doc = Value::Tagged(Box::new(serde_yaml_ng::value::TaggedValue {
                tag: serde_yaml_ng::value::Tag::new("read-file"),
                value: Value::String(name.into()),
            }));
            resolve_tags(doc, "k", dir.path())
        };
        assert_eq!(read("secret").unwrap(), Value::String("s3cret".into()));
        for bad in ["/dev/zero", "/dev/null", "big", "."] {
            let err = read(bad).unwrap_err();
            assert_eq!(err.0, "k", "{bad}");
        }
    }
}
