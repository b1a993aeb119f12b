//! Test helpers for JWT authentication: a real HTTP/1.1 key set (JWKS) server on
//! loopback, signing keys generated at run time, and token minting.
//!
//! ```ignore
//! #[path = "common/jwks_server.rs"]
//! mod jwks_server;
//! use jwks_server::{claims, Behavior, JwksServer, TestKey};
//!
//! let key = TestKey::rsa(Algorithm::RS256, "k1");
//! let server = JwksServer::start(&[&key]).await;        // http://127.0.0.1:PORT/jwks
//! let token = key.sign(&claims("https://issuer", "aud", "alice"));
//! server.set_behavior(Behavior::Status(500));           // the next fetches fail
//! server.set_keys(&[&key, &other]);                      // swap the served key set
//! assert_eq!(server.requests(), 1);
//! server.stop().await; server.restart().await;           // same port
//! ```
//!
//! The server answers every request (any method, any path) from the current
//! [`Behavior`] and counts it. Every answer closes the connection, so each fetch is
//! a new request. Keys are never written to disk.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::signature::KeyPair as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, AlgorithmFamily, EncodingKey};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// How the server answers the next requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Behavior {
    /// 200 with the current key set document (the default).
    Serve,
    /// This status with a short text body.
    Status(u16),
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with `{"keys":[]}`.
    Empty,
    /// Reads the request and never answers (until the client gives up or the server stops).
    Hang,
    /// Serves the key set as it is when the request arrives, but only after
    /// this long (a slow key server: a key published meanwhile is not in
    /// this answer).
    Delay(Duration),
}

struct Shared {
    body: Mutex<String>,
    behavior: Mutex<Behavior>,
    requests: AtomicUsize,
    paths: Mutex<Vec<String>>,
}

/// A key set server on `127.0.0.1`. Stops when dropped.
pub(crate) struct JwksServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl JwksServer {
    /// Starts a server on a free loopback port serving these keys' public JWKs.
    pub(crate) async fn start(keys: &[&TestKey]) -> JwksServer {
        Self::start_with_document(jwks(keys)).await
    }

    /// Starts a server serving this JSON document.
    pub(crate) async fn start_with_document(document: Value) -> JwksServer {
        let shared = Arc::new(Shared {
            body: Mutex::new(document.to_string()),
            behavior: Mutex::new(Behavior::Serve),
            requests: AtomicUsize::new(0),
            paths: Mutex::new(Vec::new()),
        });
        let listener = listen("127.0.0.1:0".parse().expect("address"));
        let addr = listener.local_addr().expect("local address");
        let task = tokio::spawn(serve(listener, shared.clone()));
        JwksServer {
            shared,
            addr,
            task: Mutex::new(Some(task)),
        }
    }

    /// The server's address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The key set URL, `http://127.0.0.1:PORT/jwks`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    /// The URL of another path on this server (every path serves the same answer).
    pub(crate) fn url_for(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    /// Serves these keys' public JWKs from now on.
    pub(crate) fn set_keys(&self, keys: &[&TestKey]) {
        self.set_document(jwks(keys));
    }

    /// Serves this JSON document from now on.
    pub(crate) fn set_document(&self, document: Value) {
        self.set_body(document.to_string());
    }

    /// Serves this exact body from now on.
    pub(crate) fn set_body(&self, body: impl Into<String>) {
        *lock(&self.shared.body) = body.into();
    }

    /// Changes how the next requests are answered.
    pub(crate) fn set_behavior(&self, behavior: Behavior) {
        *lock(&self.shared.behavior) = behavior;
    }

    /// Requests received so far (including unanswered ones).
    pub(crate) fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// The request paths received so far.
    pub(crate) fn paths(&self) -> Vec<String> {
        lock(&self.shared.paths).clone()
    }

    /// Sets the request count back to zero.
    pub(crate) fn reset_requests(&self) {
        self.shared.requests.store(0, Ordering::SeqCst);
    }

    /// Waits until at least `count` requests were received, up to `limit`. Returns
    /// whether they were.
    pub(crate) async fn wait_for_requests(&self, count: usize, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.requests() < count {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Stops listening and drops every open connection: clients get "connection refused".
    pub(crate) async fn stop(&self) {
        let task = lock(&self.task).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same port (after [`JwksServer::stop`]), keeping the
    /// document, behavior and request count.
    pub(crate) async fn restart(&self) {
        self.stop().await;
        let listener = listen(self.addr);
        *lock(&self.task) = Some(tokio::spawn(serve(listener, self.shared.clone())));
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn listen(addr: SocketAddr) -> tokio::net::TcpListener {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(addr).expect("bind a loopback port");
    socket.listen(128).expect("listen")
}

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    // Connections live in this set: aborting the server task drops them all.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        connections.spawn(answer(stream, shared.clone()));
    }
}

async fn answer(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let path = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_owned();
    lock(&shared.paths).push(path);
    shared.requests.fetch_add(1, Ordering::SeqCst);

    let behavior = lock(&shared.behavior).clone();
    let (status, body) = match behavior {
        Behavior::Serve => (200, lock(&shared.body).clone()),
        Behavior::Status(code) => (code, format!("status {code}\n")),
        Behavior::Garbage => (200, "<html>this is not a key set</html>".to_owned()),
        Behavior::Empty => (200, r#"{"keys":[]}"#.to_owned()),
        Behavior::Hang => {
            // Keep the connection open without answering, until the client leaves
            // (or the server stops).
            let _ = stream.read(&mut buf).await;
            return;
        }
        Behavior::Delay(delay) => {
            let body = lock(&shared.body).clone();
            tokio::time::sleep(delay).await;
            (200, body)
        }
    };
    let response = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        if status == 200 { "OK" } else { "Status" },
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A signing key made at run time, with what a test needs to configure its verifier.
pub(crate) struct TestKey {
    /// The algorithm tokens are signed with.
    pub alg: Algorithm,
    /// The `kid` put in token headers and in the JWK (`None`: no `kid`).
    pub kid: Option<String>,
    encoding: EncodingKey,
    public_pem: Option<String>,
    secret: Option<Vec<u8>>,
}

impl TestKey {
    /// A key of the right kind for `alg`: RSA 2048, P-256/P-384, Ed25519 or a random
    /// HMAC secret as long as the hash output.
    pub(crate) fn generate(alg: Algorithm, kid: &str) -> TestKey {
        match alg.family() {
            AlgorithmFamily::Rsa => Self::rsa(alg, kid),
            AlgorithmFamily::Ec => Self::ec(alg, kid),
            AlgorithmFamily::Ed => Self::ed25519(kid),
            AlgorithmFamily::Hmac => {
                let len = match alg {
                    Algorithm::HS384 => 48,
                    Algorithm::HS512 => 64,
                    _ => 32,
                };
                Self::hmac(alg, &random_bytes(len)).with_kid(Some(kid))
            }
        }
    }

    /// A new 2048-bit RSA key for RS256/384/512 or PS256/384/512.
    pub(crate) fn rsa(alg: Algorithm, kid: &str) -> TestKey {
        assert_eq!(alg.family(), AlgorithmFamily::Rsa, "not an RSA algorithm");
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .expect("RSA key generation");
        let private: Pkcs8V1Der = pair.as_der().expect("PKCS#8");
        let public: PublicKeyX509Der = pair.public_key().as_der().expect("SPKI");
        let private_pem = pem("PRIVATE KEY", private.as_ref());
        TestKey {
            alg,
            kid: Some(kid.to_owned()),
            encoding: EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("RSA PEM"),
            public_pem: Some(pem("PUBLIC KEY", public.as_ref())),
            secret: None,
        }
    }

    /// A new P-256 (ES256) or P-384 (ES384) key.
    pub(crate) fn ec(alg: Algorithm, kid: &str) -> TestKey {
        let signing = match alg {
            Algorithm::ES256 => &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            Algorithm::ES384 => &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            _ => panic!("not an ECDSA algorithm: {alg:?}"),
        };
        let pair = aws_lc_rs::signature::EcdsaKeyPair::generate(signing).expect("EC key");
        let private = pair.to_pkcs8v1().expect("PKCS#8");
        let public: PublicKeyX509Der = pair.public_key().as_der().expect("SPKI");
        TestKey {
            alg,
            kid: Some(kid.to_owned()),
            encoding: EncodingKey::from_ec_der(private.as_ref()),
            public_pem: Some(pem("PUBLIC KEY", public.as_ref())),
            secret: None,
        }
    }

    /// A new Ed25519 (EdDSA) key.
    pub(crate) fn ed25519(kid: &str) -> TestKey {
        let pair = aws_lc_rs::signature::Ed25519KeyPair::generate().expect("Ed25519 key");
        let private = pair.to_pkcs8v1().expect("PKCS#8");
        let public: PublicKeyX509Der = pair.public_key().as_der().expect("SPKI");
        TestKey {
            alg: Algorithm::EdDSA,
            kid: Some(kid.to_owned()),
            encoding: EncodingKey::from_ed_der(private.as_ref()),
            public_pem: Some(pem("PUBLIC KEY", public.as_ref())),
            secret: None,
        }
    }

    /// An HMAC key (HS256/384/512) with this secret and no `kid`.
    pub(crate) fn hmac(alg: Algorithm, secret: &[u8]) -> TestKey {
        assert_eq!(alg.family(), AlgorithmFamily::Hmac, "not an HMAC algorithm");
        TestKey {
            alg,
            kid: None,
            encoding: EncodingKey::from_secret(secret),
            public_pem: None,
            secret: Some(secret.to_vec()),
        }
    }

    /// The same key with another `kid` (`None`: tokens and JWK without `kid`).
    pub(crate) fn with_kid(mut self, kid: Option<&str>) -> TestKey {
        self.kid = kid.map(str::to_owned);
        self
    }

    /// The same key material used with another algorithm of its family (e.g. PS256
    /// with an RS256 key).
    pub(crate) fn with_alg(mut self, alg: Algorithm) -> TestKey {
        assert_eq!(alg.family(), self.alg.family(), "another key family");
        self.alg = alg;
        self
    }

    /// The public key in PEM (`PUBLIC KEY`, SubjectPublicKeyInfo). Panics for HMAC.
    pub(crate) fn public_pem(&self) -> &str {
        self.public_pem
            .as_deref()
            .expect("an HMAC key has no public key")
    }

    /// The HMAC secret. Panics for asymmetric keys.
    pub(crate) fn secret(&self) -> &[u8] {
        self.secret
            .as_deref()
            .expect("an asymmetric key has no secret")
    }

    /// The jsonwebtoken signing key.
    pub(crate) fn encoding_key(&self) -> &EncodingKey {
        &self.encoding
    }

    /// The public JWK: `kty` and key parameters, `kid` (if any), `alg` and `use: sig`.
    /// For HMAC keys, the `oct` JWK (which a verifier must not accept from a key set).
    pub(crate) fn jwk(&self) -> Value {
        let jwk = Jwk::from_encoding_key(&self.encoding, self.alg).expect("JWK");
        let mut value = serde_json::to_value(jwk).expect("JWK JSON");
        let object = value.as_object_mut().expect("JWK object");
        object.insert("use".into(), json!("sig"));
        if let Some(kid) = &self.kid {
            object.insert("kid".into(), json!(kid));
        }
        value
    }

    /// A token with header `{"typ":"JWT","alg":ALG,"kid":KID}` and these claims.
    pub(crate) fn sign(&self, claims: &Value) -> String {
        let mut header = json!({"typ": "JWT", "alg": alg_name(self.alg)});
        if let Some(kid) = &self.kid {
            header["kid"] = json!(kid);
        }
        self.sign_with_header(&header, claims)
    }

    /// A token with exactly this header and these claims, signed with this key's
    /// algorithm (whatever the header's `alg` says).
    pub(crate) fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        self.sign_raw(&header.to_string(), &claims.to_string())
    }

    /// A token with exactly these header and payload texts (e.g. with duplicate
    /// names), signed with this key's algorithm.
    pub(crate) fn sign_raw(&self, header_json: &str, payload_json: &str) -> String {
        let message = format!("{}.{}", b64url(header_json), b64url(payload_json));
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &self.encoding, self.alg).expect("sign");
        format!("{message}.{signature}")
    }
}

/// A real 1024-bit RSA public key (PEM, SubjectPublicKeyInfo), as BuildGrid's
/// own RS256 test key is: too small for aws-lc-rs to verify with.
pub(crate) const RSA_1024_PUBLIC_PEM: &str = include_str!("../keys/rs1024.pub.pem");

/// The public JWK (RS256, `use: sig`) of [`RSA_1024_PUBLIC_PEM`] with this `kid`.
pub(crate) fn rsa_1024_jwk(kid: &str) -> Value {
    use x509_parser::prelude::FromDer as _;
    let (_, pem) = x509_parser::pem::parse_x509_pem(RSA_1024_PUBLIC_PEM.as_bytes()).expect("PEM");
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&pem.contents).expect("SPKI");
    let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = spki.parsed() else {
        panic!("not an RSA key")
    };
    let n: Vec<u8> = rsa
        .modulus
        .iter()
        .copied()
        .skip_while(|b| *b == 0)
        .collect();
    assert_eq!(n.len() * 8, 1024);
    json!({"kty": "RSA", "n": b64url(n), "e": b64url(rsa.exponent), "kid": kid, "alg": "RS256", "use": "sig"})
}

/// The key set document serving these keys' public JWKs.
pub(crate) fn jwks(keys: &[&TestKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
}

/// A token that is not signed by any key: `base64url(header).base64url(claims).signature`.
pub(crate) fn unsigned_token(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        b64url(header.to_string()),
        b64url(claims.to_string())
    )
}

/// Unpadded base64url.
pub(crate) fn b64url(data: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// Now, in seconds since the epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Typical claims: `iss`, `aud`, `sub`, `iat` and `nbf` now, `exp` in 10 minutes.
pub(crate) fn claims(iss: &str, aud: &str, sub: &str) -> Value {
    let now = now();
    json!({"iss": iss, "aud": aud, "sub": sub, "iat": now, "nbf": now, "exp": now + 600})
}

/// Random bytes (for HMAC secrets).
pub(crate) fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    aws_lc_rs::rand::fill(&mut bytes).expect("random bytes");
    bytes
}

/// The JOSE name of an algorithm (`RS256`, `EdDSA`, ...).
pub(crate) fn alg_name(alg: Algorithm) -> String {
    serde_json::to_value(alg)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .expect("algorithm name")
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}
