//! `resource_name`: ByteStream resource names.

use super::*;

/// The canonical spelling of a parsed resource name.
pub(super) fn canonical(r: &ResourceName<'_>) -> String {
    let mut out = String::new();
    if !r.instance.is_empty() {
        out.push_str(r.instance);
        out.push('/');
    }
    if let Some(uuid) = r.uuid {
        out.push_str("uploads/");
        out.push_str(uuid);
        out.push('/');
    }
    match r.compressor {
        None => out.push_str("blobs/"),
        Some(c) => {
            out.push_str("compressed-blobs/");
            out.push_str(c.as_str());
            out.push('/');
        }
    }
    if let Some(f) = r.digest_function {
        out.push_str(f);
        out.push('/');
    }
    out.push_str(r.hash);
    out.push('/');
    out.push_str(&r.size.to_string());
    out
}

/// Fuzzes ByteStream resource names: the input (as UTF-8, lossily) is parsed for
/// reading and for writing. What parses has an instance that is a whole-segment
/// prefix of the name without reserved or empty segments, a hexadecimal hash and a
/// non-negative size; its canonical spelling parses to the same thing;
/// `instance_of` agrees with `parse`; no name parses both for reading and writing.
pub fn resource_name(data: &[u8]) {
    let name = String::from_utf8_lossy(data);
    let name = name.as_ref();
    let mut parsed = 0;
    for access in [Access::Read, Access::Write] {
        let result = resource::parse(name, access);
        assert_eq!(
            resource::instance_of(name, access),
            result.as_ref().map(|r| r.instance).map_err(Clone::clone)
        );
        let Ok(r) = result else {
            continue;
        };
        parsed += 1;
        assert_eq!(r.access, access);
        assert_eq!(r.uuid.is_some(), access == Access::Write);
        assert!(name.len() <= 4096);
        assert!(name.starts_with(r.instance), "the instance is not a prefix");
        if !r.instance.is_empty() {
            assert_eq!(name.as_bytes().get(r.instance.len()), Some(&b'/'));
            for segment in r.instance.split('/') {
                assert!(!segment.is_empty(), "empty instance segment");
                assert!(!resource::RESERVED_SEGMENTS.contains(&segment));
            }
        }
        assert!(!r.hash.is_empty() && r.hash.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(r.size >= 0);
        if let Some(uuid) = r.uuid {
            assert!(!uuid.is_empty() && !uuid.contains('/'));
        }
        let again = canonical(&r);
        let reparsed = resource::parse(&again, access);
        assert_eq!(
            reparsed.as_ref(),
            Ok(&r),
            "canonical form {again:?} differs"
        );
    }
    assert!(parsed < 2, "{name:?} parses for reading and for writing");
}
