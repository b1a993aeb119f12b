//! Unit tests of the framing: peeks, budgets, decompression, trailers.

use super::*;
use http_body_util::{BodyExt, StreamBody};
use std::io::Write;

fn framed(msg: &[u8], compressed: bool) -> Vec<u8> {
    let mut v = vec![u8::from(compressed)];
    v.extend((msg.len() as u32).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

fn body_of(chunks: Vec<Vec<u8>>) -> Body {
    let frames = chunks
        .into_iter()
        .map(|c| Ok::<_, Status>(Frame::data(Bytes::from(c))));
    Body::new(StreamBody::new(futures_util::stream::iter(frames)))
}

const LIMITS: Limits = Limits {
    max_message: 1024,
    max_decompressed: 4096,
};

fn no_budget(_: usize) -> Result<(), Status> {
    Ok(())
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

#[tokio::test]
async fn a_stream_is_read_to_its_first_message_and_passed_on_whole() {
    let mut wire = framed(b"hello", false);
    wire.extend(framed(b"world", false));
    let original = wire.clone();
    // Split at awkward places: inside the header and inside the message.
    let chunks = vec![wire[..2].to_vec(), wire[2..7].to_vec(), wire[7..].to_vec()];
    let first = read_first(
        body_of(chunks),
        Encoding::Identity,
        LIMITS,
        Cardinality::Many,
        no_budget,
    )
    .await
    .unwrap();
    assert_eq!(first.message.as_deref(), Some(&b"hello"[..]));
    let all = first
        .into_body(None, None)
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&all[..], &original[..]);
}

#[tokio::test]
async fn a_unary_call_is_read_whole_and_a_second_message_refused() {
    let one = framed(b"only", false);
    let first = read_first(
        body_of(vec![one.clone()]),
        Encoding::Identity,
        LIMITS,
        Cardinality::One,
        no_budget,
    )
    .await
    .unwrap();
    assert_eq!(first.message.as_deref(), Some(&b"only"[..]));
    assert_eq!(
        &first
            .into_body(None, None)
            .collect()
            .await
            .unwrap()
            .to_bytes()[..],
        &one[..]
    );

    let mut two = framed(b"first", false);
    two.extend(framed(b"second", false));
    for chunks in [
        vec![two.clone()],
        vec![two[..10].to_vec(), two[10..].to_vec()],
        vec![two[..12].to_vec()],
    ] {
        let err = read_first(
            body_of(chunks),
            Encoding::Identity,
            LIMITS,
            Cardinality::One,
            no_budget,
        )
        .await
        .err()
        .unwrap();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
}

#[tokio::test]
async fn empty_stream_and_truncated_message() {
    let first = read_first(
        body_of(vec![]),
        Encoding::Identity,
        LIMITS,
        Cardinality::One,
        no_budget,
    )
    .await
    .unwrap();
    assert!(first.message.is_none());
    let err = read_first(
        body_of(vec![framed(b"abc", false)[..6].to_vec()]),
        Encoding::Identity,
        LIMITS,
        Cardinality::Many,
        no_budget,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code(), tonic::Code::Internal);
}

#[tokio::test]
async fn a_lying_length_prefix_is_refused_before_reading() {
    let mut head = vec![0u8];
    head.extend((u32::MAX).to_be_bytes());
    let err = read_first(
        body_of(vec![head]),
        Encoding::Identity,
        LIMITS,
        Cardinality::One,
        no_budget,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
}

#[tokio::test]
async fn the_pending_budget_sees_every_byte_before_it_is_kept() {
    let wire = framed(&[7u8; 600], false);
    let mut seen = 0;
    let err = read_first(
        body_of(vec![wire[..300].to_vec(), wire[300..].to_vec()]),
        Encoding::Identity,
        LIMITS,
        Cardinality::One,
        |n| {
            seen += n;
            if seen > 400 {
                Err(Status::resource_exhausted("budget"))
            } else {
                Ok(())
            }
        },
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
}

#[test]
fn decompression_is_strict_about_what_follows_the_first_member_or_frame() {
    // One member, stream or frame: fine.
    assert_eq!(
        &decompress(Encoding::Gzip, &gzip(b"team-a"), 100).unwrap()[..],
        b"team-a"
    );
    assert_eq!(
        &decompress(Encoding::Deflate, &zlib(b"team-a"), 100).unwrap()[..],
        b"team-a"
    );
    let z = zstd::encode_all(&b"team-a"[..], 3).unwrap();
    assert_eq!(&decompress(Encoding::Zstd, &z, 100).unwrap()[..], b"team-a");
    // Two gzip members (what grpc-js, Java, Go and Python read both of).
    let mut two = gzip(b"team-a");
    two.extend(gzip(b"prod"));
    let err = decompress(Encoding::Gzip, &two, 100).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    // Trailing bytes after a member, a zlib stream, a zstd frame.
    let mut trailing = gzip(b"team-a");
    trailing.push(0);
    assert_eq!(
        decompress(Encoding::Gzip, &trailing, 100)
            .unwrap_err()
            .code(),
        tonic::Code::InvalidArgument
    );
    let mut trailing = zlib(b"team-a");
    trailing.extend(b"junk");
    assert_eq!(
        decompress(Encoding::Deflate, &trailing, 100)
            .unwrap_err()
            .code(),
        tonic::Code::InvalidArgument
    );
    let mut frames = zstd::encode_all(&b"team-a"[..], 3).unwrap();
    frames.extend(zstd::encode_all(&b"prod"[..], 3).unwrap());
    assert_eq!(
        decompress(Encoding::Zstd, &frames, 100).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    // Corrupt data, and a truncated member.
    assert_eq!(
        decompress(Encoding::Gzip, b"not gzip at all", 100)
            .unwrap_err()
            .code(),
        tonic::Code::InvalidArgument
    );
    let g = gzip(b"team-a");
    assert_eq!(
        decompress(Encoding::Gzip, &g[..g.len() - 3], 100)
            .unwrap_err()
            .code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        decompress(Encoding::Gzip, b"", 100).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
}

#[tokio::test]
async fn bombs_are_refused_and_the_flag_needs_an_encoding() {
    let bomb = zstd::encode_all(&vec![0u8; 10 << 20][..], 19).unwrap();
    assert!(bomb.len() < 1024);
    let err = read_first(
        body_of(vec![framed(&bomb, true)]),
        Encoding::Zstd,
        LIMITS,
        Cardinality::One,
        no_budget,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    let gz = gzip(&vec![0u8; 1 << 20]);
    assert_eq!(
        decompress(Encoding::Gzip, &gz, 4096).unwrap_err().code(),
        tonic::Code::ResourceExhausted
    );
    let err = read_first(
        body_of(vec![framed(&gzip(b"x"), true)]),
        Encoding::Identity,
        LIMITS,
        Cardinality::One,
        no_budget,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code(), tonic::Code::Internal);
}

#[tokio::test]
async fn compressed_messages_are_passed_on_as_the_gate_decoded_them() {
    let mut wire = framed(&gzip(b"first"), true);
    wire.extend(framed(&gzip(b"second"), true));
    let first = read_first(
        body_of(vec![wire]),
        Encoding::Gzip,
        LIMITS,
        Cardinality::Many,
        no_budget,
    )
    .await
    .unwrap();
    assert_eq!(first.message.as_deref(), Some(&b"first"[..]));
    let all = first
        .into_body(None, None)
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let mut expected = framed(b"first", false);
    expected.extend(framed(b"second", false));
    assert_eq!(&all[..], &expected[..]);
}

#[tokio::test]
async fn checked_checks_every_message_and_delivers_those_before_a_refusal() {
    let mut wire = framed(b"ok", false);
    wire.extend(framed(b"ok", false));
    let good_len = wire.len();
    wire.extend(framed(b"bad", false));
    wire.extend(framed(b"ok", false));
    let check: Check = Box::new(|m: &[u8]| {
        if m == b"ok" {
            Ok(())
        } else {
            Err(Status::permission_denied("changed"))
        }
    });
    let mut checked = Checked::new(
        body_of(vec![wire.clone()]),
        Encoding::Identity,
        LIMITS,
        Cardinality::Many,
        Some(check),
    );
    let mut got = Vec::new();
    let err = loop {
        match checked.frame().await.unwrap() {
            Ok(f) => got.extend_from_slice(&f.into_data().unwrap()),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        &got[..],
        &wire[..good_len],
        "the messages before the refusal, whole"
    );
    assert!(checked.frame().await.is_none());
}

#[tokio::test]
async fn a_message_is_not_passed_on_before_it_is_whole() {
    let wire = framed(b"a message in two frames", false);
    let (a, b) = wire.split_at(9);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(2);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut checked = Checked::new(
        Body::new(StreamBody::new(stream)),
        Encoding::Identity,
        LIMITS,
        Cardinality::Many,
        None,
    );
    tx.send(Ok(Frame::data(Bytes::copy_from_slice(a))))
        .await
        .unwrap();
    let early = tokio::time::timeout(std::time::Duration::from_millis(50), checked.frame()).await;
    assert!(early.is_err(), "half a message was passed on: {early:?}");
    tx.send(Ok(Frame::data(Bytes::copy_from_slice(b))))
        .await
        .unwrap();
    let got = checked.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&got[..], &wire[..]);
}

#[tokio::test]
async fn request_trailers_are_refused() {
    let frames = || {
        let mut t = HeaderMap::new();
        t.insert("x-request-actor", "forged".parse().unwrap());
        vec![
            Ok::<_, Status>(Frame::data(Bytes::from(framed(b"ok", false)))),
            Ok(Frame::trailers(t)),
        ]
    };
    let body = Body::new(StreamBody::new(futures_util::stream::iter(frames())));
    let err = read_first(
        body,
        Encoding::Identity,
        LIMITS,
        Cardinality::One,
        no_budget,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let body = Body::new(StreamBody::new(futures_util::stream::iter(frames())));
    let mut checked = Checked::new(body, Encoding::Identity, LIMITS, Cardinality::Many, None);
    assert!(checked.frame().await.unwrap().is_ok());
    let err = checked.frame().await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(checked.frame().await.is_none(), "no trailers passed on");
}
