//! The checks behind gridgate's fuzz targets, for fuzzing only.
//!
//! Each function takes the raw bytes of one fuzz input, drives one of the
//! parsers that see untrusted or operator-written text, and panics when an
//! invariant of that parser does not hold. The cargo-fuzz targets in
//! `tests/fuzz/fuzz_targets/` call them under libFuzzer, and
//! `tests/fuzz_corpus.rs` replays the kept corpus (`tests/fuzz/seeds/`)
//! through the very same functions on the stable toolchain, so a fixed crash
//! stays fixed. They are not part of gridgate's API: the panics are the point
//! here, and nothing on a request path calls this module.
//!
//! | function | what it drives |
//! | --- | --- |
//! | [`token`] | JWT parsing and validation ([`crate::gate::jwt`]) |
//! | [`frame`] | the frame peek, decompression, the protobuf scanner and `route::locate` |
//! | [`resource_name`] | ByteStream resource names ([`crate::reapi::resource`]) |
//! | [`policy`] | ACL policy files ([`crate::gate::policy`]) |
//! | [`config`] | config files ([`crate::config::Config::parse`]) and the Gate built from them |

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use aws_lc_rs::hmac;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::FutureExt as _;
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody};
use prost::Message as _;
use serde_json::{Map, Value};
use tonic::body::Body;
use tonic::Status;

use crate::config::{Config, JwtConfig, JwtKeyConfig};
use crate::gate::frame::{self, Encoding, Limits};
use crate::gate::identity::{AuthMethod, Identity, PeerCertificate};
use crate::gate::jwt::{ClaimMapping, JwtAuthenticator, JwtSettings, KeySource, ProviderSettings};
use crate::gate::policy::{self, MatchMode, Policy, PolicyOptions};
use crate::gate::route::{self, Locate, RouteTable};
use crate::gate::scan::{self, Kind, Value as ScanValue};
use crate::gate::Gate;
use crate::proto::build::bazel::remote::execution::v2 as reapi;
use crate::proto::google::devtools::build::v1 as bes;
use crate::reapi::resource::{self, Access, ResourceName};

// ---------------------------------------------------------------------------------
// token

/// The HMAC keys the fuzzed authenticators know: provider A, provider B and the
/// single (issuer-less) provider.
const SECRET_A: &[u8] = b"gridgate fuzz secret of provider a, 40B!";
const SECRET_B: &[u8] = b"gridgate fuzz secret of provider b: long enough for HS512 (64B)!!";
const SECRET_SINGLE: &[u8] = b"gridgate fuzz single-provider key";
const ISSUER_A: &str = "https://a.example";
const ISSUER_B: &str = "https://b.example";
const AUDIENCE_A: &str = "gridgate";
const LEEWAY_SECS: u64 = 60;
/// A hundred years: long enough for a token with fixed times (seeds are replayed
/// for years) to pass, short enough for `exp` far in the future to be refused.
const MAX_LIFETIME_SECS: u64 = 100 * 365 * 86_400;

/// The keys a structured input may be signed with: (secret, JWT `alg`).
const SIGNERS: [(&[u8], &str); 6] = [
    (SECRET_A, "HS256"),
    (SECRET_B, "HS256"),
    (SECRET_B, "HS384"),
    (SECRET_B, "HS512"),
    (SECRET_SINGLE, "HS256"),
    (SECRET_A, "HS512"),
];

/// The HMAC of a JWT `alg` of [`SIGNERS`].
fn hmac_algorithm(alg: &str) -> hmac::Algorithm {
    match alg {
        "HS384" => hmac::HMAC_SHA384,
        "HS512" => hmac::HMAC_SHA512,
        _ => hmac::HMAC_SHA256,
    }
}

struct Authenticators {
    /// Two providers chosen by issuer: A (HS256, audience required) and B
    /// (HS256/384/512, no audience); a lifetime cap; no cache.
    multi: Arc<JwtAuthenticator>,
    /// BuildGrid's single provider without issuer (HS256), with a small cache.
    single: Arc<JwtAuthenticator>,
}

fn secret_provider(
    name: &str,
    issuer: Option<&str>,
    algorithms: Vec<jsonwebtoken::Algorithm>,
    secret: &[u8],
    audiences: &[&str],
) -> ProviderSettings {
    ProviderSettings {
        name: name.into(),
        issuer: issuer.map(str::to_owned),
        algorithms,
        key: KeySource::Secret(secret.to_vec()),
        audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
        allow_weak_secret: false,
    }
}

fn authenticators() -> &'static Authenticators {
    use jsonwebtoken::Algorithm::{HS256, HS384, HS512};
    static AUTH: OnceLock<Authenticators> = OnceLock::new();
    AUTH.get_or_init(|| {
        let multi = JwtSettings {
            providers: vec![
                secret_provider("a", Some(ISSUER_A), vec![HS256], SECRET_A, &[AUDIENCE_A]),
                secret_provider(
                    "b",
                    Some(ISSUER_B),
                    vec![HS256, HS384, HS512],
                    SECRET_B,
                    &[],
                ),
            ],
            leeway: Duration::from_secs(LEEWAY_SECS),
            max_lifetime: Some(Duration::from_secs(MAX_LIFETIME_SECS)),
            cache_capacity: 0,
            claims: ClaimMapping::default(),
        };
        let single = JwtSettings {
            providers: vec![secret_provider(
                "single",
                None,
                vec![HS256],
                SECRET_SINGLE,
                &[],
            )],
            leeway: Duration::from_secs(LEEWAY_SECS),
            max_lifetime: None,
            cache_capacity: 64,
            claims: ClaimMapping::default(),
        };
        Authenticators {
            multi: JwtAuthenticator::new(multi).expect("the fuzzing JWT settings are valid"),
            single: JwtAuthenticator::new(single).expect("the fuzzing JWT settings are valid"),
        }
    })
}

fn sign(key: &[u8], alg: &str, message: &[u8]) -> String {
    let tag = hmac::sign(&hmac::Key::new(hmac_algorithm(alg), key), message);
    URL_SAFE_NO_PAD.encode(tag.as_ref())
}

/// The signers (indices into [`SIGNERS`]) whose MAC the token's third part is.
fn valid_signers(token: &str) -> Vec<usize> {
    let Some((signed, signature)) = token.rsplit_once('.') else {
        return Vec::new();
    };
    let Ok(signature) = URL_SAFE_NO_PAD.decode(signature) else {
        return Vec::new();
    };
    SIGNERS
        .iter()
        .enumerate()
        .filter(|(_, (key, alg))| {
            let key = hmac::Key::new(hmac_algorithm(alg), key);
            hmac::verify(&key, signed.as_bytes(), &signature).is_ok()
        })
        .map(|(i, _)| i)
        .collect()
}

fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A claim as seconds, the way a reader of the spec would take it.
fn seconds(claims: &Map<String, Value>, name: &str) -> Option<f64> {
    claims.get(name).and_then(Value::as_f64)
}

/// What must hold when `auth` accepted `token`, given the claims it carries.
fn check_accepted(token: &str, multi: bool, identity: &Identity, started: u64) {
    let signers = valid_signers(token);
    let mut parts = token.split('.');
    let header = parts.next().unwrap_or_default();
    let payload = parts.next().unwrap_or_default();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap_or_default())
        .expect("an accepted token has a JSON header");
    let claims: Map<String, Value> =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap_or_default())
            .expect("an accepted token has a JSON object as claims");
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert_eq!(identity.method, AuthMethod::Jwt);
    assert_eq!(*identity.claims, claims, "the identity carries the claims");

    let exp = seconds(&claims, "exp").expect("an accepted token has a numeric exp");
    let now = now_secs();
    assert!(
        exp + LEEWAY_SECS as f64 + 1.0 >= started as f64,
        "accepted an expired token (exp {exp}, now {started})"
    );
    for claim in ["iat", "nbf"] {
        if let Some(t) = seconds(&claims, claim) {
            assert!(
                t <= (now + LEEWAY_SECS) as f64 + 1.0,
                "accepted a token whose {claim} ({t}) is in the future"
            );
        }
    }
    let signed_by = |secret: &[u8], algs: &[&str]| {
        signers.iter().any(|&i| {
            let (key, name) = SIGNERS[i];
            key == secret && name == alg && algs.contains(&name)
        })
    };
    if !multi {
        assert!(
            signed_by(SECRET_SINGLE, &["HS256"]),
            "single provider accepted a token not signed with its key as HS256"
        );
        return;
    }
    match claims.get("iss").and_then(Value::as_str) {
        Some(ISSUER_A) => {
            assert!(
                signed_by(SECRET_A, &["HS256"]),
                "provider a accepted a token not signed with its key as HS256"
            );
            let audience_ok = match claims.get("aud") {
                Some(Value::String(a)) => a == AUDIENCE_A,
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(AUDIENCE_A)),
                _ => false,
            };
            assert!(
                audience_ok,
                "provider a accepted a token for another audience"
            );
        }
        Some(ISSUER_B) => {
            assert!(
                signed_by(SECRET_B, &["HS256", "HS384", "HS512"]),
                "provider b accepted a token not signed with its key"
            );
        }
        other => panic!("accepted a token of issuer {other:?}"),
    }
    let start = seconds(&claims, "iat")
        .or_else(|| seconds(&claims, "nbf"))
        .unwrap_or(started as f64);
    assert!(
        exp - start <= MAX_LIFETIME_SECS as f64 + 1.0,
        "accepted a token living longer than the cap (exp {exp}, start {start})"
    );
}

/// Runs one token through both authenticators and checks what they accept.
fn authenticate_all(token: &str, must_be_signed: bool) {
    let auth = authenticators();
    for (multi, authenticator) in [(true, &auth.multi), (false, &auth.single)] {
        let started = now_secs();
        // Static keys: verification never waits, so the future is ready at once.
        let result = authenticator
            .authenticate(token)
            .now_or_never()
            .expect("verification with static keys completes without waiting");
        if let Ok(identity) = result {
            if must_be_signed {
                assert!(
                    !valid_signers(token).is_empty(),
                    "accepted a token that no known key signed"
                );
            }
            check_accepted(token, multi, &identity, started);
        }
    }
}

/// Fuzzes JWT parsing and validation.
///
/// The first byte chooses how the rest becomes a token:
/// - `0` (mod 4): the rest is the token text, as a client sends it; it must never
///   be accepted unless one of the known keys made its signature;
/// - `1`: the rest is the claims JSON, with a fixed header, signed with one of the
///   known keys (chosen by the first byte) so claim validation is reached;
/// - `2`: the rest is `header JSON \0 claims JSON`, both signed;
/// - `3`: the rest is `header.payload` as written (base64url or not), signed.
///
/// Whatever is accepted must satisfy what the configuration asks for (expiry,
/// issuer and matching key, audience, lifetime cap, `iat`/`nbf` not in the future).
pub fn token(data: &[u8]) {
    if let Some((token, raw)) = token_of(data) {
        authenticate_all(&token, raw);
    }
}

/// The token an input of [`token`] stands for, and whether it is raw client text.
fn token_of(data: &[u8]) -> Option<(String, bool)> {
    let (&first, rest) = data.split_first()?;
    let (key, alg) = SIGNERS[usize::from(first >> 2) % SIGNERS.len()];
    let signed = |header: &[u8], claims: &[u8]| {
        let text = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature = sign(key, alg, text.as_bytes());
        format!("{text}.{signature}")
    };
    Some(match first & 3 {
        0 => (String::from_utf8_lossy(rest).into_owned(), true),
        1 => {
            let header = match first >> 5 {
                0 => format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#),
                1 => format!(r#"{{"alg":"{alg}","kid":"k1"}}"#),
                2 => format!(r#"{{"alg":"{alg}","crit":["exp"]}}"#),
                _ => format!(r#"{{"alg":"{alg}"}}"#),
            };
            (signed(header.as_bytes(), rest), false)
        }
        2 => {
            let (header, claims) = match rest.iter().position(|&b| b == 0) {
                Some(at) => (&rest[..at], &rest[at + 1..]),
                None => (rest, &b"{}"[..]),
            };
            (signed(header, claims), false)
        }
        _ => {
            let text = String::from_utf8_lossy(rest);
            let signature = sign(key, alg, text.as_bytes());
            (format!("{text}.{signature}"), false)
        }
    })
}

// ---------------------------------------------------------------------------------
// frame

/// gRPC paths whose routes cover every way of locating an instance.
const FRAME_PATHS: [&str; 8] = [
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
    "/google.longrunning.Operations/GetOperation",
    "/google.longrunning.Operations/ListOperations",
    "/google.bytestream.ByteStream/Read",
    "/google.bytestream.ByteStream/Write",
    "/google.devtools.build.v1.PublishBuildEvent/PublishBuildToolEventStream",
    "/gridgate.v1.BuildEvents/QueryEventStreams",
    "/grpc.health.v1.Health/Check",
];

fn routes() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(RouteTable::new)
}

/// A request body delivering `wire` in chunks of `chunk` bytes (all at once for 0).
fn chunked_body(wire: &Bytes, chunk: usize) -> Body {
    let size = if chunk == 0 { wire.len().max(1) } else { chunk };
    let frames: Vec<Result<Frame<Bytes>, Status>> = (0..wire.len())
        .step_by(size)
        .map(|at| Ok(Frame::data(wire.slice(at..(at + size).min(wire.len())))))
        .collect();
    Body::new(StreamBody::new(futures_util::stream::iter(frames)))
}

/// Every frame a ready body yields, until its end or its first error.
fn drain(mut body: Body) -> (Vec<u8>, Option<Status>) {
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
fn scan_message(msg: &[u8]) {
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
fn whole_uncompressed_messages(passed: &[u8], limits: Limits) -> usize {
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

// ---------------------------------------------------------------------------------
// resource_name

/// The canonical spelling of a parsed resource name.
fn canonical(r: &ResourceName<'_>) -> String {
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

// ---------------------------------------------------------------------------------
// policy

/// Callers with and without each kind of value a rule can test.
fn identities() -> &'static [Identity] {
    static IDS: OnceLock<Vec<Identity>> = OnceLock::new();
    IDS.get_or_init(|| {
        let mut claims = Map::new();
        claims.insert("ref".into(), Value::from("refs/heads/main"));
        claims.insert("ref_protected".into(), Value::from(true));
        claims.insert("run".into(), Value::from(42));
        claims.insert("groups".into(), Value::from(vec!["a", "b"]));
        let jwt = Identity {
            method: AuthMethod::Jwt,
            actor: Some("ci-bot".into()),
            subject: Some("user@example.com".into()),
            workflow: Some("build".into()),
            claims: Arc::new(claims),
            certificate: None,
        };
        let cert = Identity {
            method: AuthMethod::Certificate,
            certificate: Some(Arc::new(PeerCertificate {
                subject: "CN=ci-bot,O=Example".into(),
                common_name: Some("ci-bot".into()),
                dns_names: vec!["ci.example.com".into(), "a.example".into()],
                uris: vec!["spiffe://example/ci".into()],
                emails: vec!["ci@example.com".into()],
                ips: vec!["10.0.0.1".into()],
            })),
            ..Identity::anonymous(None)
        };
        let empty = Identity {
            method: AuthMethod::Headers,
            actor: Some(String::new()),
            subject: Some(String::new()),
            workflow: Some(String::new()),
            ..Identity::anonymous(None)
        };
        vec![Identity::anonymous(None), jwt, cert, empty]
    })
}

/// A directory of this process's own for files the checks write.
fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("gridgate-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the scratch directory can be made");
        dir
    })
}

/// Fuzzes ACL policy files: the first byte chooses whole or prefix matching, the
/// rest (as UTF-8, lossily) is the file. A policy that loads answers every
/// question the same way twice, with a reason; `policy check` loads exactly what
/// `Policy::from_yaml` loads.
pub fn policy(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let opts = PolicyOptions {
        match_mode: if first & 1 == 0 {
            MatchMode::Whole
        } else {
            MatchMode::Prefix
        },
    };
    let text = String::from_utf8_lossy(rest);
    let loaded = Policy::from_yaml(&text, "fuzz.yaml", &opts);

    if first & 2 != 0 {
        let file = scratch_dir().join("policy.yaml");
        std::fs::write(&file, text.as_bytes()).expect("the scratch file can be written");
        let checked = policy::check(&file, &opts, &RouteTable::rpc_names());
        assert_eq!(
            checked.is_ok(),
            loaded.is_ok(),
            "policy check and the loader disagree: {:?} / {:?}",
            checked.as_ref().err(),
            loaded.as_ref().err()
        );
    }

    let Ok(policy) = loaded else {
        return;
    };
    let mut instances: Vec<String> = policy.instances().into_iter().take(8).collect();
    instances.extend(["", "team-a", "team-a/sub", "x/y/z"].map(String::from));
    for instance in &instances {
        for rpc in ["Write", "FindMissingBlobs", "Execute"] {
            for identity in identities() {
                let decision = policy.decide(instance, rpc, identity);
                assert!(!decision.reason.is_empty());
                assert!(decision.allowed || decision.dry_run_denied.is_none());
                assert_eq!(decision, policy.decide(instance, rpc, identity));
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// config

/// A directory holding the files a fuzzed config may name by relative path.
fn config_base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = scratch_dir().join("config");
        std::fs::create_dir_all(dir.join("policies")).expect("the config base can be made");
        let files: [(&str, &[u8]); 7] = [
            (
                "hmac.secret",
                b"0123456789abcdef0123456789abcdef0123456789abcdef\n",
            ),
            ("short.secret", b"short\n"),
            ("policy.yaml", b"team-a:\n  allow:\n    - actor: ci-.*\n"),
            (
                "policies/team-b.yaml",
                b"team-b:\n  allow: all\n  deny:\n    - requests: [Write]\n",
            ),
            (
                "server.crt",
                b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
            ),
            (
                "server.key",
                b"-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n",
            ),
            ("empty", b""),
        ];
        for (name, content) in files {
            std::fs::write(dir.join(name), content).expect("a config base file can be written");
        }
        dir
    })
}

/// Fuzzes config files: the input (as UTF-8, lossily) is parsed with relative
/// paths taken from a directory holding a secret, policies and TLS files. A config
/// that parses can be summarized, parses the same way again, and the Gate is built
/// from it (or refuses it) without panicking.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let base = config_base();
    let Ok(config) = Config::parse(&text, "fuzz.yaml", base) else {
        return;
    };
    let summary = config.summary();
    let again = Config::parse(&text, "fuzz.yaml", base).map(|c| c.summary());
    assert_eq!(again.ok().as_deref(), Some(summary.as_str()));
    let Ok(gate) = Gate::from_config(&config) else {
        return;
    };
    if let (Some(settings), Some(auth)) = (&config.authorization.jwt, gate.jwt()) {
        check_configured_tokens(settings, auth);
    }
}

/// Sends the configured authenticator a token signed with each configured HMAC
/// secret: valid unless its lifetime is over the configured cap, and the same
/// token already expired, refused unless the leeway is longer than its age.
/// Skipped when a provider fetches a key set (that would go to the network).
fn check_configured_tokens(settings: &JwtConfig, auth: &JwtAuthenticator) {
    const IAT: u64 = 1_700_000_000;
    const EXP: u64 = 4_000_000_000;
    if settings
        .providers
        .iter()
        .any(|p| matches!(p.key, JwtKeyConfig::Jwks { .. }))
    {
        return;
    }
    let header = |alg: &str| URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}"}}"#));
    for provider in &settings.providers {
        let JwtKeyConfig::Secret(secret) = &provider.key else {
            continue;
        };
        for algorithm in &provider.algorithms {
            let alg = match algorithm {
                jsonwebtoken::Algorithm::HS256 => "HS256",
                jsonwebtoken::Algorithm::HS384 => "HS384",
                jsonwebtoken::Algorithm::HS512 => "HS512",
                _ => continue,
            };
            for exp in [EXP, IAT + 1] {
                let mut claims = Map::new();
                claims.insert("sub".into(), Value::from("alice"));
                claims.insert("iat".into(), Value::from(IAT));
                claims.insert("exp".into(), Value::from(exp));
                if let Some(issuer) = &provider.issuer {
                    claims.insert("iss".into(), Value::from(issuer.as_str()));
                }
                if let Some(audience) = provider.audiences.first() {
                    claims.insert("aud".into(), Value::from(audience.as_str()));
                }
                let text = format!(
                    "{}.{}",
                    header(alg),
                    URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string())
                );
                let token = format!("{text}.{}", sign(secret, alg, text.as_bytes()));
                let started = now_secs();
                let result = auth
                    .authenticate(&token)
                    .now_or_never()
                    .expect("verification with static keys completes without waiting");
                let leeway = settings.leeway.as_secs();
                let within_cap = settings
                    .max_token_lifetime
                    .is_none_or(|max| max.as_secs() >= exp - IAT);
                if exp == EXP {
                    assert_eq!(
                        result.is_ok(),
                        within_cap,
                        "a valid {alg} token of {:?}: {result:?}",
                        provider.name
                    );
                } else if leeway.saturating_add(exp) < started {
                    assert!(result.is_err(), "an expired {alg} token was accepted");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(auth: &JwtAuthenticator, data: &[u8]) -> bool {
        let (token, _) = token_of(data).unwrap();
        auth.authenticate(&token).now_or_never().unwrap().is_ok()
    }

    /// The structured modes reach acceptance, so the invariants on accepted
    /// tokens are exercised, and the checks refuse what they should.
    #[test]
    fn signed_inputs_are_accepted_and_checked() {
        let auth = authenticators();
        let a =
            br#"{"iss":"https://a.example","aud":"gridgate","iat":1700000000,"exp":4000000000}"#;
        // Mode 1, signer 0: provider a's key, HS256.
        assert!(accepted(&auth.multi, &[&[1u8][..], a].concat()));
        // Signer 1: provider b's key, under provider a's issuer.
        assert!(!accepted(&auth.multi, &[&[1u8 | 1 << 2][..], a].concat()));
        // Signer 4: the single provider's key.
        let single = br#"{"sub":"alice","exp":4000000000}"#;
        assert!(accepted(
            &auth.single,
            &[&[1u8 | 4 << 2][..], single].concat()
        ));
        // Far beyond the lifetime cap.
        let b = br#"{"iss":"https://b.example","iat":1700000000,"exp":99999999999}"#;
        assert!(!accepted(&auth.multi, &[&[1u8 | 3 << 2][..], b].concat()));
        token(&[&[1u8][..], a].concat());
    }
}
