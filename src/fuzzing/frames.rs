//! `frame`: the frame peek, decompression, the protobuf scanner and `route::locate`.

use super::*;

/// gRPC paths whose routes cover every way of locating an instance.
pub(super) const FRAME_PATHS: [&str; 8] = [
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
    "/google.longrunning.Operations/GetOperation",
    "/google.longrunning.Operations/ListOperations",
    "/google.bytestream.ByteStream/Read",
    "/google.bytestream.ByteStream/Write",
    "/google.devtools.build.v1.PublishBuildEvent/PublishBuildToolEventStream",
    "/gridgate.v1.BuildEvents/QueryEventStreams",
    "/grpc.health.v1.Health/Check",
];

pub(super) fn routes() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(RouteTable::new)
}

/// A request body delivering `wire` in chunks of `chunk` bytes (all at once for 0).
pub(super) fn chunked_body(wire: &Bytes, chunk: usize) -> Body {
    let size = if chunk == 0 { wire.len().max(1) } else { chunk };
    let frames: Vec<Result<Frame<Bytes>, Status>> = (0..wire.len())
        .step_by(size)
        .map(|at| Ok(Frame::data(wire.slice(at..(at + size).min(wire.len())))))
        .collect();
    Body::new(StreamBody::new(futures_util::stream::iter(frames)))
}

/// Every frame a ready body yields, until its end or its first error.
pub(super) fn drain(mut body: Body) -> (Vec<u8>, Option<Status>) {
    let mut out = Vec::new();
    loop {
        match body
            .frame()
            .now_or_never()
            .expect("a body over ready data never waits")
        {
            None => return (out, None),
            Some(Err(status)) => return (out, Some(status)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data);
                }
            }
        }
    }
}

/// The scanner's reading of a message against prost's, and `locate` against the
/// scanner, for the routes of [`FRAME_PATHS`].
pub(super) fn scan_message(msg: &[u8]) {
    let mut pos = 0;
    while pos < msg.len() {
        let before = pos;
        match scan::read_varint(msg, &mut pos) {
            Ok(_) => assert!(pos > before && pos - before <= 10 && pos <= msg.len()),
            Err(_) => break,
        }
    }

    let within = |s: &[u8]| {
        let (start, end) = (msg.as_ptr() as usize, msg.as_ptr() as usize + msg.len());
        s.is_empty() || (s.as_ptr() as usize >= start && s.as_ptr() as usize + s.len() <= end)
    };
    for path in [&[1u32][..], &[4, 1, 1], &[4, 1, 6], &[6], &[2]] {
        if let Ok(Some(ScanValue::Bytes(b))) = scan::last_at_path(msg, path, Kind::String) {
            assert!(within(b), "the scanner returned bytes outside the message");
            assert!(std::str::from_utf8(b).is_ok());
        }
        let _ = scan::last_at_path(msg, path, Kind::Varint);
    }

    // Where prost and the scanner both read a message, they read the same values.
    if let (Ok(decoded), Ok(instance)) = (
        reapi::FindMissingBlobsRequest::decode(msg),
        scan::string_at(msg, &[1]),
    ) {
        assert_eq!(
            decoded.instance_name, instance,
            "scanner and prost disagree"
        );
    }
    if let Ok(decoded) = bes::PublishBuildToolEventStreamRequest::decode(msg) {
        let sid = decoded
            .ordered_build_event
            .and_then(|e| e.stream_id)
            .unwrap_or_default();
        if let Ok(build) = scan::string_at(msg, &[4, 1, 1]) {
            assert_eq!(build, sid.build_id, "scanner and prost disagree");
        }
        if let Ok(invocation) = scan::string_at(msg, &[4, 1, 6]) {
            assert_eq!(invocation, sid.invocation_id, "scanner and prost disagree");
        }
        if let Ok(component) = scan::varint_at(msg, &[4, 1, 3]) {
            assert_eq!(
                component as i32, sid.component,
                "scanner and prost disagree"
            );
        }
        if let Ok(project) = scan::string_at(msg, &[6]) {
            assert_eq!(project, decoded.project_id, "scanner and prost disagree");
        }
    }

    for path in FRAME_PATHS {
        let Some(route) = routes().get(path) else {
            panic!("{path} is not routed");
        };
        let Ok(found) = route::locate(route, msg) else {
            continue;
        };
        match route.locate {
            Locate::None => assert_eq!(found, None),
            Locate::Field(f) => {
                assert_eq!(found.as_deref(), scan::string_at(msg, &[f]).ok());
            }
            Locate::OperationName(f) => {
                let name = scan::string_at(msg, &[f]).unwrap_or_default();
                let instance = found.unwrap_or_default();
                assert!(name.starts_with(&instance) && instance.len() < name.len().max(1));
            }
            Locate::Resource(access) => {
                let name = scan::string_at(msg, &[1]).unwrap_or_default();
                let instance = found.unwrap_or_default();
                assert_eq!(resource::instance_of(name, access), Ok(instance.as_str()));
            }
            Locate::QueryScope(f) => {
                let name = scan::string_at(msg, &[f]).unwrap_or_default();
                assert_eq!(found.as_deref(), (!name.is_empty()).then_some(name));
            }
        }
    }
}

/// Fuzzes the frame peek and the instance scanner.
///
/// Bytes 0..4 choose the `grpc-encoding`, the route, the chunk size and the
/// limits; the rest is the request body on the wire. Checked: decompression never
/// yields more than its limit; [`frame::read_first`] returns a message within the
/// limits, and the body passed on holds only whole uncompressed messages (one at
/// most for a unary route), as does [`frame::Checked`]; the scanner reads what
/// prost reads and stays inside the message; `route::locate` agrees with the scanner.
pub fn frame(data: &[u8]) {
    let [flags, chunk, max_message, max_plain, rest @ ..] = data else {
        return;
    };
    let encoding = match flags & 3 {
        0 => Encoding::Identity,
        1 => Encoding::Gzip,
        2 => Encoding::Deflate,
        _ => Encoding::Zstd,
    };
    let path = FRAME_PATHS[usize::from(flags >> 2) % FRAME_PATHS.len()];
    let limits = Limits {
        max_message: 1 + usize::from(*max_message) * 16,
        max_decompressed: 1 + usize::from(*max_plain) * 64,
    };
    let wire = Bytes::copy_from_slice(rest);

    // The bytes as one message: decompressed, and scanned.
    match frame::decompress(encoding, rest, limits.max_decompressed) {
        Ok(plain) => {
            assert_ne!(encoding, Encoding::Identity);
            assert!(
                plain.len() <= limits.max_decompressed,
                "decompressed past the limit"
            );
            scan_message(&plain);
        }
        Err(_) => scan_message(rest),
    }

    // The bytes as a request body: the first message read, then the body
    // passed on, for a unary route and a stream.
    for cardinality in [frame::Cardinality::One, frame::Cardinality::Many] {
        let read = frame::read_first(
            chunked_body(&wire, usize::from(*chunk)),
            encoding,
            limits,
            cardinality,
            |_| Ok(()),
        )
        .now_or_never()
        .expect("reading a body over ready data never waits");
        let Ok(first) = read else { continue };
        if let Some(message) = &first.message {
            let [flag, a, b, c, d, ..] = rest else {
                panic!("a message was read from fewer than 5 bytes");
            };
            let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
            assert!(len <= limits.max_message, "read a message over the limit");
            if *flag == 0 {
                assert_eq!(&message[..], &rest[5..5 + len]);
            } else {
                assert!(message.len() <= limits.max_decompressed);
            }
        } else {
            assert!(rest.is_empty(), "no message read from a non-empty body");
        }
        let (passed, _) = drain(first.into_body(None, None));
        let messages = whole_uncompressed_messages(&passed, limits);
        if cardinality == frame::Cardinality::One {
            assert!(messages <= 1, "a unary body passed on {messages} messages");
        }
    }

    // The bytes as a client stream: every message held to the first one's instance.
    let Some(route) = routes().get(path).copied() else {
        panic!("{path} is not routed");
    };
    let mut first: Option<Option<String>> = None;
    let check: frame::Check = Box::new(move |msg: &[u8]| {
        let instance =
            route::locate(&route, msg).map_err(|e| Status::invalid_argument(e.to_string()))?;
        match &first {
            None => {
                first = Some(instance);
                Ok(())
            }
            Some(f) if *f == instance => Ok(()),
            Some(_) => Err(Status::permission_denied("instance changed")),
        }
    });
    let checked = frame::Checked::new(
        chunked_body(&wire, usize::from(*chunk)),
        encoding,
        limits,
        frame::Cardinality::Many,
        Some(check),
    );
    let (passed, _) = drain(Body::new(checked));
    whole_uncompressed_messages(&passed, limits);
}

/// Counts the messages of a body the Gate passed on, checking each is whole,
/// uncompressed and within the limits.
pub(super) fn whole_uncompressed_messages(passed: &[u8], limits: Limits) -> usize {
    let mut pos = 0;
    let mut n = 0;
    while pos < passed.len() {
        let [flag, a, b, c, d, ..] = passed[pos..] else {
            panic!("a partial message header was passed on");
        };
        assert_eq!(flag, 0, "a compressed message was passed on");
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        assert!(len <= limits.max_message.max(limits.max_decompressed));
        assert!(
            passed.len() >= pos + 5 + len,
            "a partial message was passed on"
        );
        pos += 5 + len;
        n += 1;
    }
    n
}
