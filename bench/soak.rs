//! The load side of `bench/soak.sh`: well-behaved clients (BES streams, CAS
//! writes and reads, with a valid ES256 token whose key is served by a JWKS
//! URL) and misbehaving ones (calls with a forged token), for a while, over
//! TLS; it counts what the well-behaved clients saw go wrong.
//!
//! ```text
//! soak setup DIR                       # ES256 key: DIR/jwks.json, DIR/token, DIR/forged-token
//! soak run --addr 127.0.0.1:PORT --ca CA --token-file F --forged-token-file G --seconds 600
//! ```
//!
//! `run` prints one line per 10 s and a summary:
//! `served=N errors=E refused_as_expected=R unexpected_refusals=U`. A
//! well-behaved call that fails is an error; it is retried once after 1 s
//! only when the status is UNAVAILABLE (a client's normal behaviour during a
//! restart), and counted as an error if the retry fails too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use clap::{Parser, Subcommand};
use gridgate::proto::build::bazel::remote::execution::v2 as re;
use gridgate::proto::google::devtools::build::v1 as bes;
use gridgate::reapi::digest::BlobKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make the key, its JWKS document and the tokens.
    Setup { dir: std::path::PathBuf },
    /// Run the clients.
    Run {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        ca: std::path::PathBuf,
        #[arg(long)]
        token_file: std::path::PathBuf,
        #[arg(long)]
        forged_token_file: std::path::PathBuf,
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Concurrent BES streamers and CAS clients (each).
        #[arg(long, default_value_t = 4)]
        clients: usize,
    },
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn setup(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({
        "sub": "soak-user", "act": "soak-client", "aud": "gridgate",
        "iat": now, "exp": now + 4 * 3600,
    });
    let sign = |key: &rcgen::KeyPair| -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("soak-1".into());
        Ok(jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())?,
        )?)
    };
    let key = rcgen::KeyPair::generate()?;
    // An uncompressed P-256 point: 0x04 || x || y.
    let point = key.public_key_raw();
    anyhow::ensure!(point.len() == 65 && point[0] == 4, "unexpected public key");
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "soak-1",
        "x": b64(&point[1..33]), "y": b64(&point[33..65]),
    }]});
    std::fs::write(dir.join("jwks.json"), jwks.to_string())?;
    std::fs::write(dir.join("token"), sign(&key)?)?;
    // Same kid and claims, another key: what an attacker without the key sends.
    std::fs::write(
        dir.join("forged-token"),
        sign(&rcgen::KeyPair::generate()?)?,
    )?;
    Ok(())
}

#[derive(Default)]
struct Counts {
    served: AtomicU64,
    errors: AtomicU64,
    refused_as_expected: AtomicU64,
    unexpected_refusals: AtomicU64,
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

/// Runs `call`; on UNAVAILABLE retries once after a second. Counts the outcome.
async fn well_behaved<F, Fut>(counts: &Counts, what: &str, mut call: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let mut result = call().await;
    if matches!(&result, Err(s) if s.code() == tonic::Code::Unavailable) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        result = call().await;
    }
    match result {
        Ok(()) => {
            counts.served.fetch_add(1, Ordering::Relaxed);
        }
        Err(s) => {
            counts.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("error: {what}: {:?} {}", s.code(), s.message());
        }
    }
}

async fn bes_client(
    ch: Channel,
    token: Arc<String>,
    counts: Arc<Counts>,
    until: Instant,
    id: usize,
) {
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let stream = bes::StreamId {
            build_id: format!("soak-{id}-{n}-{}", std::process::id()),
            invocation_id: "inv".into(),
            component: 3,
        };
        let events: Vec<bes::PublishBuildToolEventStreamRequest> = (1..=50)
            .map(|seq| bes::PublishBuildToolEventStreamRequest {
                ordered_build_event: Some(bes::OrderedBuildEvent {
                    stream_id: Some(stream.clone()),
                    sequence_number: seq,
                    event: Some(bes::BuildEvent {
                        event_time: None,
                        event: Some(if seq == 50 {
                            bes::build_event::Event::ComponentStreamFinished(
                                bes::build_event::BuildComponentStreamFinished { r#type: 1 },
                            )
                        } else {
                            bes::build_event::Event::BazelEvent(prost_types::Any {
                                type_url: "type.googleapis.com/build_event_stream.BuildEvent"
                                    .into(),
                                value: vec![7u8; 512],
                            })
                        }),
                    }),
                }),
                project_id: "soak".into(),
                ..Default::default()
            })
            .collect();
        well_behaved(&counts, "BES stream", || {
            let ch = ch.clone();
            let events = events.clone();
            let token = token.clone();
            async move {
                let mut client = bes::publish_build_event_client::PublishBuildEventClient::new(ch);
                let mut acks = client
                    .publish_build_tool_event_stream(authed(tokio_stream::iter(events), &token))
                    .await?
                    .into_inner();
                let mut expected = 1;
                while let Some(ack) = acks.message().await? {
                    if ack.sequence_number != expected {
                        return Err(tonic::Status::data_loss(format!(
                            "ack {} where {expected} was due",
                            ack.sequence_number
                        )));
                    }
                    expected += 1;
                }
                if expected != 51 {
                    return Err(tonic::Status::data_loss(format!(
                        "{} acks of 50",
                        expected - 1
                    )));
                }
                Ok(())
            }
        })
        .await;
    }
}

async fn cas_client(
    ch: Channel,
    token: Arc<String>,
    counts: Arc<Counts>,
    until: Instant,
    id: usize,
) {
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let data = format!("soak blob {id} {n} ").repeat(200).into_bytes();
        let digest = BlobKey::of(&data).to_digest();
        well_behaved(&counts, "CAS write+read", || {
            let ch = ch.clone();
            let data = data.clone();
            let digest = digest.clone();
            let token = token.clone();
            async move {
                let mut cas =
                    re::content_addressable_storage_client::ContentAddressableStorageClient::new(
                        ch,
                    );
                cas.batch_update_blobs(authed(
                    re::BatchUpdateBlobsRequest {
                        instance_name: "soak".into(),
                        requests: vec![re::batch_update_blobs_request::Request {
                            digest: Some(digest.clone()),
                            data: data.clone().into(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                    &token,
                ))
                .await?;
                let read = cas
                    .batch_read_blobs(authed(
                        re::BatchReadBlobsRequest {
                            instance_name: "soak".into(),
                            digests: vec![digest],
                            ..Default::default()
                        },
                        &token,
                    ))
                    .await?
                    .into_inner();
                match read.responses.first() {
                    Some(r) if r.data.as_ref() == data.as_slice() => Ok(()),
                    _ => Err(tonic::Status::data_loss("read back differs")),
                }
            }
        })
        .await;
    }
}

async fn refused_client(ch: Channel, forged: Arc<String>, counts: Arc<Counts>, until: Instant) {
    while Instant::now() < until {
        let mut cas = re::content_addressable_storage_client::ContentAddressableStorageClient::new(
            ch.clone(),
        );
        let r = cas
            .find_missing_blobs(authed(
                re::FindMissingBlobsRequest {
                    instance_name: "soak".into(),
                    ..Default::default()
                },
                &forged,
            ))
            .await;
        match r {
            Err(s) if s.code() == tonic::Code::Unauthenticated => {
                counts.refused_as_expected.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                counts.unexpected_refusals.fetch_add(1, Ordering::Relaxed);
                eprintln!("forged token not refused as UNAUTHENTICATED: {other:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run(
    addr: &str,
    ca: &std::path::Path,
    token: String,
    forged: String,
    seconds: u64,
    clients: usize,
) -> anyhow::Result<bool> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
        .domain_name("localhost");
    let port = addr.rsplit(':').next().unwrap_or("0");
    let endpoint = Endpoint::from_shared(format!("https://localhost:{port}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    let until = Instant::now() + Duration::from_secs(seconds);
    let counts = Arc::new(Counts::default());
    let token = Arc::new(token);
    let forged = Arc::new(forged);
    let mut tasks = Vec::new();
    for id in 0..clients {
        // One connection per client: a restart of a connection is visible.
        let ch = endpoint.connect_lazy();
        tasks.push(tokio::spawn(bes_client(
            ch.clone(),
            token.clone(),
            counts.clone(),
            until,
            id,
        )));
        tasks.push(tokio::spawn(cas_client(
            ch,
            token.clone(),
            counts.clone(),
            until,
            id,
        )));
    }
    tasks.push(tokio::spawn(refused_client(
        endpoint.connect_lazy(),
        forged,
        counts.clone(),
        until,
    )));
    let started = Instant::now();
    let reporter = {
        let counts = counts.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                println!(
                    "t={:>4}s served={} errors={} refused_as_expected={} unexpected_refusals={}",
                    started.elapsed().as_secs(),
                    counts.served.load(Ordering::Relaxed),
                    counts.errors.load(Ordering::Relaxed),
                    counts.refused_as_expected.load(Ordering::Relaxed),
                    counts.unexpected_refusals.load(Ordering::Relaxed),
                );
            }
        })
    };
    for t in tasks {
        t.await?;
    }
    reporter.abort();
    let errors = counts.errors.load(Ordering::Relaxed);
    let unexpected = counts.unexpected_refusals.load(Ordering::Relaxed);
    println!(
        "summary: seconds={seconds} served={} errors={errors} refused_as_expected={} unexpected_refusals={unexpected}",
        counts.served.load(Ordering::Relaxed),
        counts.refused_as_expected.load(Ordering::Relaxed),
    );
    Ok(errors == 0 && unexpected == 0)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup { dir } => setup(&dir).map(|_| true),
        Command::Run {
            addr,
            ca,
            token_file,
            forged_token_file,
            seconds,
            clients,
        } => {
            let read =
                |p: &std::path::Path| std::fs::read_to_string(p).map(|s| s.trim().to_string());
            match (read(&token_file), read(&forged_token_file)) {
                (Ok(t), Ok(f)) => run(&addr, &ca, t, f, seconds, clients).await,
                (Err(e), _) | (_, Err(e)) => Err(e.into()),
            }
        }
    };
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
