//! ByteStream resource names of the Remote Execution API.
//!
//! ```text
//! Read:  {instance}/blobs/{digest_function/}{hash}/{size}
//!        {instance}/compressed-blobs/{compressor}/{digest_function/}{hash}/{size}
//! Write: {instance}/uploads/{uuid}/blobs/{digest_function/}{hash}/{size}{/optional_metadata}
//!        {instance}/uploads/{uuid}/compressed-blobs/{compressor}/{digest_function/}{hash}/{size}{/optional_metadata}
//! ```
//!
//! An empty instance drops the leading `/`. The instance is everything before
//! the first segment that is `blobs`, `compressed-blobs` or `uploads`; instance
//! names may not contain those segments (REAPI reserves them), so the split is
//! unambiguous. Digest-function segments are lower case and present only for
//! functions beyond the classic ones (e.g. `sha256tree`, `blake3`).

use std::fmt;

/// Whether a resource name is for reading or for writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `{instance}/blobs/...` or `{instance}/compressed-blobs/...`, for
    /// ByteStream Read.
    Read,
    /// `{instance}/uploads/{uuid}/...`, for ByteStream Write.
    Write,
}

/// A compressor named in a `compressed-blobs` resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressor {
    /// `zstd`.
    Zstd,
    /// `deflate`.
    Deflate,
    /// `brotli`.
    Brotli,
}

impl Compressor {
    fn parse(s: &str) -> Option<Compressor> {
        match s {
            "zstd" => Some(Compressor::Zstd),
            "deflate" => Some(Compressor::Deflate),
            "brotli" => Some(Compressor::Brotli),
            _ => None,
        }
    }

    /// The name used in resource names.
    pub fn as_str(self) -> &'static str {
        match self {
            Compressor::Zstd => "zstd",
            Compressor::Deflate => "deflate",
            Compressor::Brotli => "brotli",
        }
    }
}

/// A parsed ByteStream resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceName<'a> {
    /// The instance name ("" for the unnamed instance).
    pub instance: &'a str,
    /// Read (`blobs`) or write (`uploads`).
    pub access: Access,
    /// The upload id (writes only).
    pub uuid: Option<&'a str>,
    /// Set for `compressed-blobs`.
    pub compressor: Option<Compressor>,
    /// The digest function segment when present (e.g. `blake3`).
    pub digest_function: Option<&'a str>,
    /// The digest's hash: hexadecimal, its length not yet checked.
    pub hash: &'a str,
    /// The digest's size in bytes (never negative).
    pub size: i64,
}

/// Why a resource name does not follow the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceError(pub &'static str);

impl fmt::Display for ResourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid resource name: {}", self.0)
    }
}

impl std::error::Error for ResourceError {}

/// Segments an instance name may not contain.
pub const RESERVED_SEGMENTS: [&str; 7] = [
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

/// Digest functions that appear as a resource-name segment.
const NAMED_DIGEST_FUNCTIONS: [&str; 3] = ["sha256tree", "blake3", "gitsha1"];

/// Parses a resource name for `access`.
pub fn parse(name: &str, access: Access) -> Result<ResourceName<'_>, ResourceError> {
    if name.len() > 4096 {
        return Err(ResourceError("longer than 4096 bytes"));
    }
    let segments: Vec<&str> = name.split('/').collect();
    let marker = match access {
        Access::Read => segments
            .iter()
            .position(|s| *s == "blobs" || *s == "compressed-blobs"),
        Access::Write => segments.iter().position(|s| *s == "uploads"),
    }
    .ok_or(ResourceError(match access {
        Access::Read => "no blobs/ or compressed-blobs/ segment",
        Access::Write => "no uploads/ segment",
    }))?;
    let instance_len = if marker == 0 {
        0
    } else {
        // Length of the first `marker` segments joined by '/'.
        segments[..marker].iter().map(|s| s.len()).sum::<usize>() + marker - 1
    };
    let instance = &name[..instance_len];
    if segments[..marker].iter().any(|s| s.is_empty()) {
        return Err(ResourceError("empty instance segment"));
    }
    if segments[..marker]
        .iter()
        .any(|s| RESERVED_SEGMENTS.contains(s))
    {
        return Err(ResourceError("instance contains a reserved segment"));
    }
    let mut rest = &segments[marker..];
    let uuid = match access {
        Access::Write => {
            let uuid = rest.get(1).copied().filter(|u| !u.is_empty());
            let uuid = uuid.ok_or(ResourceError("missing upload id"))?;
            rest = &rest[2..];
            Some(uuid)
        }
        Access::Read => None,
    };
    let compressor = match rest.first().copied() {
        Some("blobs") => {
            rest = &rest[1..];
            None
        }
        Some("compressed-blobs") => {
            let c = rest
                .get(1)
                .and_then(|c| Compressor::parse(c))
                .ok_or(ResourceError("unknown compressor"))?;
            rest = &rest[2..];
            Some(c)
        }
        _ => return Err(ResourceError("expected blobs/ or compressed-blobs/")),
    };
    let digest_function = match rest.first() {
        Some(f) if NAMED_DIGEST_FUNCTIONS.contains(f) => {
            rest = &rest[1..];
            Some(*f)
        }
        _ => None,
    };
    let (hash, size, extra) = match rest {
        [hash, size, extra @ ..] => (*hash, *size, extra),
        _ => return Err(ResourceError("expected {hash}/{size}")),
    };
    if hash.is_empty() || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ResourceError("hash is not hexadecimal"));
    }
    if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ResourceError("size is not a non-negative integer"));
    }
    let size: i64 = size
        .parse()
        .map_err(|_| ResourceError("size out of range"))?;
    if access == Access::Read && !extra.is_empty() {
        return Err(ResourceError("trailing segments after the size"));
    }
    Ok(ResourceName {
        instance,
        access,
        uuid,
        compressor,
        digest_function,
        hash,
        size,
    })
}

/// The instance part of a resource name, for routing and authorization.
pub fn instance_of(name: &str, access: Access) -> Result<&str, ResourceError> {
    parse(name, access).map(|r| r.instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn reads() {
        let name = format!("team-a/blobs/{H}/0");
        let r = parse(&name, Access::Read).unwrap();
        assert_eq!((r.instance, r.hash, r.size), ("team-a", H, 0));
        let name = format!("blobs/{H}/12");
        let r = parse(&name, Access::Read).unwrap();
        assert_eq!(r.instance, "");
        let name = format!("a/b/compressed-blobs/zstd/{H}/5");
        let r = parse(&name, Access::Read).unwrap();
        assert_eq!(r.instance, "a/b");
        assert_eq!(r.compressor, Some(Compressor::Zstd));
        let name = format!("main/blobs/blake3/{H}/5");
        let r = parse(&name, Access::Read).unwrap();
        assert_eq!(r.digest_function, Some("blake3"));
        // BuildGrid's regex gets this one wrong ("main/compressed-").
        let name = format!("main/compressed-blobs/zstd/{H}/1");
        let r = parse(&name, Access::Read).unwrap();
        assert_eq!(r.instance, "main");
    }

    #[test]
    fn writes() {
        let name = format!("team-a/uploads/3f0b/blobs/{H}/10/some/metadata");
        let r = parse(&name, Access::Write).unwrap();
        assert_eq!((r.instance, r.uuid), ("team-a", Some("3f0b")));
        let name = format!("uploads/u/compressed-blobs/zstd/sha256tree/{H}/10");
        let r = parse(&name, Access::Write).unwrap();
        assert_eq!(r.instance, "");
        assert_eq!(r.digest_function, Some("sha256tree"));
    }

    #[test]
    fn refusals() {
        for bad in [
            "team-a/blobs/xyz/1".to_string(),
            format!("team-a/blobs/{H}"),
            format!("team-a/blobs/{H}/-1"),
            format!("team-a/blobs/{H}/1/extra"),
            format!("team-a/compressed-blobs/lz4/{H}/1"),
            format!("/blobs/{H}/1"),
            format!("a//b/blobs/{H}/1"),
            "".to_string(),
        ] {
            assert!(parse(&bad, Access::Read).is_err(), "{bad}");
        }
        assert!(parse(&format!("a/uploads//blobs/{H}/1"), Access::Write).is_err());
        assert!(parse(&format!("a/blobs/{H}/1"), Access::Write).is_err());
        assert!(parse(&format!("a/blobs/uploads/u/blobs/{H}/1"), Access::Write).is_err());
    }
}
