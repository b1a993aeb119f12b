//! A protobuf wire-format scanner that reads one field of a message without
//! decoding the rest.
//!
//! The Gate needs the instance name of a request before any service decodes it.
//! It must read exactly what prost will read, or an attacker can show the Gate
//! one value and the service another:
//!
//! - a singular scalar or string field that occurs several times takes its
//!   **last** value;
//! - a singular message field that occurs several times is the **merge** of its
//!   occurrences, so a nested field takes its last value across all of them;
//! - a known field with the wrong wire type, invalid UTF-8 in a string, a
//!   truncated value or a group makes prost refuse the message, so the scanner
//!   refuses it too.
//!
//! [`last_at_path`] walks a path of field numbers (`[4, 1, 1]` is
//! `ordered_build_event.stream_id.build_id`) and returns the effective value.

/// Why a message could not be scanned; prost would refuse it as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanError {
    /// A varint, a length or a value runs past the end of the message.
    Truncated,
    /// A varint longer than 10 bytes.
    BadVarint,
    /// Field number 0, wire types 6/7, or a group (wire types 3/4).
    BadTag,
    /// A field on the path has a wire type its declaration does not allow.
    WrongWireType,
    /// A string field holds invalid UTF-8.
    InvalidUtf8,
    /// Message nesting deeper than the scanner follows.
    TooDeep,
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScanError::Truncated => "truncated protobuf message",
            ScanError::BadVarint => "malformed varint in protobuf message",
            ScanError::BadTag => "malformed field tag in protobuf message",
            ScanError::WrongWireType => "a field has the wrong wire type",
            ScanError::InvalidUtf8 => "a string field is not valid UTF-8",
            ScanError::TooDeep => "protobuf message nested too deeply",
        })
    }
}

impl std::error::Error for ScanError {}

/// The value of a field on a path's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// A length-delimited value (string, bytes or message).
    Bytes(&'a [u8]),
    /// A varint (enum, bool, integer).
    Varint(u64),
}

/// What kind of value a path ends in; decides the wire types accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A `string`: length-delimited, valid UTF-8.
    String,
    /// A varint scalar (enum, int, bool).
    Varint,
}

/// Reads a base-128 varint at `*pos`. Like prost, a varint whose tenth byte
/// would overflow 64 bits (anything but 0 or 1 there) is refused, so the
/// scanner never reads a value prost would not.
pub fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, ScanError> {
    let mut value: u64 = 0;
    for i in 0..10 {
        let b = *buf.get(*pos).ok_or(ScanError::Truncated)?;
        *pos += 1;
        if i == 9 && b > 1 {
            return Err(ScanError::BadVarint);
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(ScanError::BadVarint)
}

/// One field of a message: number, wire type and where its value lies.
pub struct Field<'a> {
    /// The field number.
    pub number: u64,
    /// The wire type (0, 1, 2 or 5).
    pub wire: u8,
    /// For wire type 2, the payload; else empty.
    pub payload: &'a [u8],
    /// For wire type 0, the value; else 0.
    pub varint: u64,
    /// The whole field as it is in the message: key, length and value.
    pub raw: &'a [u8],
}

/// Iterates over the top-level fields of a message: the one protobuf field
/// walker (the Gate's scanner and the upstream rewriter both use it). After
/// the first error it ends.
pub fn fields(buf: &[u8]) -> impl Iterator<Item = Result<Field<'_>, ScanError>> {
    let mut pos = 0usize;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || pos >= buf.len() {
            return None;
        }
        let start = pos;
        let item = (|| {
            let key = read_varint(buf, &mut pos)?;
            let number = key >> 3;
            let wire = (key & 7) as u8;
            if number == 0 || number > u64::from(u32::MAX >> 3) {
                return Err(ScanError::BadTag);
            }
            match wire {
                0 => {
                    let v = read_varint(buf, &mut pos)?;
                    Ok(Field {
                        number,
                        wire,
                        payload: &[],
                        varint: v,
                        raw: &buf[start..pos],
                    })
                }
                1 | 5 => {
                    let n = if wire == 1 { 8 } else { 4 };
                    if buf.len() - pos < n {
                        return Err(ScanError::Truncated);
                    }
                    pos += n;
                    Ok(Field {
                        number,
                        wire,
                        payload: &[],
                        varint: 0,
                        raw: &buf[start..pos],
                    })
                }
                2 => {
                    let len = read_varint(buf, &mut pos)?;
                    let len = usize::try_from(len).map_err(|_| ScanError::Truncated)?;
                    if buf.len() - pos < len {
                        return Err(ScanError::Truncated);
                    }
                    let payload = &buf[pos..pos + len];
                    pos += len;
                    Ok(Field {
                        number,
                        wire,
                        payload,
                        varint: 0,
                        raw: &buf[start..pos],
                    })
                }
                _ => Err(ScanError::BadTag),
            }
        })();
        if item.is_err() {
            failed = true;
        }
        Some(item)
    })
}

const MAX_DEPTH: usize = 8;

/// The effective value at `path` (field numbers from the top-level message
/// down), as prost would decode it, or `None` when the field is absent.
///
/// Every field number on the path but the last must be a singular message
/// field; the last is a field of `kind`. The whole message is checked for
/// well-formed framing (like prost, which reads every field).
pub fn last_at_path<'a>(
    msg: &'a [u8],
    path: &[u32],
    kind: Kind,
) -> Result<Option<Value<'a>>, ScanError> {
    let mut found = None;
    walk(msg, path, kind, 0, &mut found)?;
    Ok(found)
}

fn walk<'a>(
    msg: &'a [u8],
    path: &[u32],
    kind: Kind,
    depth: usize,
    found: &mut Option<Value<'a>>,
) -> Result<(), ScanError> {
    if depth > MAX_DEPTH {
        return Err(ScanError::TooDeep);
    }
    let Some((&head, rest)) = path.split_first() else {
        return Ok(());
    };
    for field in fields(msg) {
        let field = field?;
        if field.number != u64::from(head) {
            continue;
        }
        if rest.is_empty() {
            match (kind, field.wire) {
                (Kind::String, 2) => {
                    std::str::from_utf8(field.payload).map_err(|_| ScanError::InvalidUtf8)?;
                    *found = Some(Value::Bytes(field.payload));
                }
                (Kind::Varint, 0) => *found = Some(Value::Varint(field.varint)),
                _ => return Err(ScanError::WrongWireType),
            }
        } else {
            if field.wire != 2 {
                return Err(ScanError::WrongWireType);
            }
            walk(field.payload, rest, kind, depth + 1, found)?;
        }
    }
    Ok(())
}

/// The effective string at `path`, or "" when absent (proto3's default).
pub fn string_at<'a>(msg: &'a [u8], path: &[u32]) -> Result<&'a str, ScanError> {
    match last_at_path(msg, path, Kind::String)? {
        Some(Value::Bytes(b)) => std::str::from_utf8(b).map_err(|_| ScanError::InvalidUtf8),
        _ => Ok(""),
    }
}

/// The effective varint at `path`, or 0 when absent.
pub fn varint_at(msg: &[u8], path: &[u32]) -> Result<u64, ScanError> {
    match last_at_path(msg, path, Kind::Varint)? {
        Some(Value::Varint(v)) => Ok(v),
        _ => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::build::bazel::remote::execution::v2 as reapi;
    use crate::proto::google::devtools::build::v1 as bes;
    use prost::Message;

    fn string_field(n: u32, s: &str) -> Vec<u8> {
        let mut v = Vec::new();
        prost::encoding::string::encode(n, &s.to_string(), &mut v);
        v
    }

    #[test]
    fn reads_instance_like_prost() {
        let req = reapi::FindMissingBlobsRequest {
            instance_name: "team-a".into(),
            blob_digests: vec![reapi::Digest {
                hash: "ab".into(),
                size_bytes: 3,
            }],
            digest_function: 0,
        };
        let buf = req.encode_to_vec();
        assert_eq!(string_at(&buf, &[1]).unwrap(), "team-a");
        assert_eq!(string_at(&[], &[1]).unwrap(), "");
    }

    #[test]
    fn a_second_instance_field_wins_as_in_prost() {
        let mut buf = string_field(1, "public");
        buf.extend(string_field(1, "prod"));
        let decoded = reapi::FindMissingBlobsRequest::decode(&buf[..]).unwrap();
        assert_eq!(decoded.instance_name, "prod");
        assert_eq!(string_at(&buf, &[1]).unwrap(), "prod");
    }

    #[test]
    fn nested_messages_merge_as_in_prost() {
        let ev = |build: &str, inv: &str| bes::OrderedBuildEvent {
            stream_id: Some(bes::StreamId {
                build_id: build.into(),
                invocation_id: inv.into(),
                component: 3,
            }),
            sequence_number: 1,
            event: None,
        };
        let req = bes::PublishBuildToolEventStreamRequest {
            ordered_build_event: Some(ev("b1", "i1")),
            project_id: "team-a".into(),
            ..Default::default()
        };
        let mut buf = req.encode_to_vec();
        // Append a second ordered_build_event that only sets build_id.
        let mut inner = Vec::new();
        prost::encoding::string::encode(1, &"b2".to_string(), &mut inner);
        let mut sid = Vec::new();
        prost::encoding::bytes::encode(1, &inner, &mut sid);
        prost::encoding::bytes::encode(4, &sid, &mut buf);
        let decoded = bes::PublishBuildToolEventStreamRequest::decode(&buf[..]).unwrap();
        let sid = decoded.ordered_build_event.unwrap().stream_id.unwrap();
        assert_eq!(string_at(&buf, &[4, 1, 1]).unwrap(), sid.build_id);
        assert_eq!(string_at(&buf, &[4, 1, 6]).unwrap(), sid.invocation_id);
        assert_eq!(varint_at(&buf, &[4, 1, 3]).unwrap(), sid.component as u64);
        assert_eq!(string_at(&buf, &[6]).unwrap(), "team-a");
    }

    #[test]
    fn refuses_what_prost_refuses() {
        // Field 1 as a varint where a string is declared.
        let buf = [0x08, 0x01];
        assert!(reapi::FindMissingBlobsRequest::decode(&buf[..]).is_err());
        assert_eq!(string_at(&buf, &[1]), Err(ScanError::WrongWireType));
        // Invalid UTF-8.
        let buf = [0x0a, 0x01, 0xff];
        assert!(reapi::FindMissingBlobsRequest::decode(&buf[..]).is_err());
        assert_eq!(string_at(&buf, &[1]), Err(ScanError::InvalidUtf8));
        // A length past the end.
        let buf = [0x0a, 0x05, b'a'];
        assert_eq!(string_at(&buf, &[1]), Err(ScanError::Truncated));
        // Truncation after the field of interest is still refused.
        let mut buf = string_field(1, "a");
        buf.extend([0x12, 0x09]);
        assert_eq!(string_at(&buf, &[1]), Err(ScanError::Truncated));
        // Groups.
        assert_eq!(string_at(&[0x0b, 0x0c], &[1]), Err(ScanError::BadTag));
        // An overlong varint.
        assert_eq!(string_at(&[0xff; 12], &[1]), Err(ScanError::BadVarint));
        // A 10-byte varint that overflows 64 bits, as a field length and as a
        // skipped varint value: prost refuses both, so does the scanner.
        let mut overflow = vec![0x0a];
        overflow.extend([0xff; 9]);
        overflow.push(0x02);
        assert!(reapi::FindMissingBlobsRequest::decode(&overflow[..]).is_err());
        assert_eq!(string_at(&overflow, &[1]), Err(ScanError::BadVarint));
        let mut skipped = string_field(1, "team-a");
        skipped.push(0x78); // field 15, an unknown varint

        skipped.extend([0x80; 9]);
        skipped.push(0x7f);
        assert!(reapi::FindMissingBlobsRequest::decode(&skipped[..]).is_err());
        assert_eq!(string_at(&skipped, &[1]), Err(ScanError::BadVarint));
        // The largest valid 10-byte varint is still read.
        let mut max = string_field(1, "team-a");
        max.push(0x78);
        max.extend([0xff; 9]);
        max.push(0x01);
        assert!(reapi::FindMissingBlobsRequest::decode(&max[..]).is_ok());
        assert_eq!(string_at(&max, &[1]), Ok("team-a"));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        for len in 0..300 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = string_at(&buf, &[1]);
            let _ = string_at(&buf, &[4, 1, 1]);
            let _ = varint_at(&buf, &[4, 1, 3]);
        }
    }
}
