//! `gridgate events query`: prints build event streams stored in a running
//! gateway, through `/gridgate.v1.BuildEvents/QueryEventStreams`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::event::component_name;
use crate::proto::google::devtools::build::v1::{build_event, OrderedBuildEvent};
use crate::proto::gridgate::v1::{
    build_events_client::BuildEventsClient, EventStreamChunk, QueryEventStreamsRequest,
};

/// `gridgate events ...`
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print the build event streams whose key matches PATTERN.
    ///
    /// A stream's key is `BUILD_ID.COMPONENT.INVOCATION_ID` with the component as
    /// a number (1 controller, 2 worker, 3 tool), as in BuildGrid; PATTERN is a
    /// regular expression searched in it ('' or '.' matches every stream). Only
    /// streams of instances your credentials may QueryEventStreams on are shown.
    ///
    /// Example: gridgate events query '^5f1c' --instance team-a --kind bazel_event --server grpcs://gate:443 --ca ca.crt --token-file ~/.gridgate-token
    Query(QueryArgs),
}

/// Arguments of `gridgate events query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Regular expression searched in BUILD_ID.COMPONENT.INVOCATION_ID.
    #[arg(value_name = "PATTERN")]
    pub pattern: String,
    /// Only streams of this instance (the publisher's --project_id).
    #[arg(long, value_name = "I")]
    pub instance: Option<String>,
    /// Only events of this kind (repeatable): bazel_event, console_output,
    /// component_stream_finished, build_enqueued, build_finished,
    /// invocation_attempt_started, invocation_attempt_finished, ...
    #[arg(long = "kind", value_name = "K")]
    pub kinds: Vec<String>,
    /// Only events with sequence number >= N.
    #[arg(long, value_name = "N")]
    pub from_seq: Option<i64>,
    /// Only events with sequence number <= N.
    #[arg(long, value_name = "N")]
    pub to_seq: Option<i64>,
    /// Only events at or after this time (RFC 3339, e.g. 2026-11-21T10:00:00Z).
    #[arg(long, value_name = "RFC3339")]
    pub since: Option<String>,
    /// How to reach the gateway.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print one JSON object per stream (one per line) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// How the CLI reaches a gateway (shared by `events` and `invocations`).
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The gateway: grpc://HOST:PORT (plaintext) or grpcs://HOST:PORT (TLS).
    #[arg(
        long,
        value_name = "URL",
        env = "GRIDGATE_SERVER",
        default_value = "grpc://127.0.0.1:50051"
    )]
    pub server: String,
    /// A file holding a bearer token, sent as `authorization: Bearer TOKEN`.
    #[arg(long, value_name = "F")]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the gateway's certificate (grpcs://).
    #[arg(long, value_name = "CA")]
    pub ca: Option<PathBuf>,
    /// A client certificate (PEM) for mTLS; needs --key.
    #[arg(long, value_name = "C", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM); needs --cert.
    #[arg(long, value_name = "K", requires = "cert")]
    pub key: Option<PathBuf>,
}

/// Runs `gridgate events ...`; returns the exit code.
pub fn run(command: EventsCommand) -> ExitCode {
    let EventsCommand::Query(args) = command;
    block_on(query(args))
}

/// Runs a CLI command's future on a small runtime; its error is printed.
pub fn block_on(f: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A request carrying the token of `--token-file`, if one was given.
pub fn authorized<T>(args: &ConnectArgs, message: T) -> Result<tonic::Request<T>, String> {
    let mut request = tonic::Request::new(message);
    if let Some(f) = &args.token_file {
        let t = String::from_utf8(read(f, "--token-file")?)
            .map_err(|_| format!("--token-file {}: not UTF-8", f.display()))?;
        let v = MetadataValue::try_from(format!("Bearer {}", t.trim()))
            .map_err(|_| format!("--token-file {}: not a valid header value", f.display()))?;
        request.metadata_mut().insert("authorization", v);
    }
    Ok(request)
}

/// A gRPC status as the CLI prints it.
pub fn status_text(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// Connects to the gateway as the arguments say.
pub async fn connect(args: &ConnectArgs) -> Result<Channel, String> {
    let (tls, rest) = if let Some(r) = args.server.strip_prefix("grpcs://") {
        (true, r)
    } else if let Some(r) = args.server.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = args.server.strip_prefix("grpc://") {
        (false, r)
    } else if let Some(r) = args.server.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!(
            "--server {:?}: expected grpc://HOST:PORT or grpcs://HOST:PORT",
            args.server
        ));
    };
    let scheme = if tls { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{rest}"))
        .map_err(|e| format!("--server {:?}: {e}", args.server))?
        .connect_timeout(Duration::from_secs(10));
    if tls {
        let ca = args.ca.as_ref().ok_or(
            "--ca is required for grpcs:// (this build trusts no system roots)".to_string(),
        )?;
        let host = rest
            .split('/')
            .next()
            .and_then(|h| h.rsplit_once(':').map(|(h, _)| h).or(Some(h)))
            .unwrap_or("localhost")
            .trim_start_matches('[')
            .trim_end_matches(']');
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(ca, "--ca")?))
            .domain_name(host);
        if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
            config = config.identity(Identity::from_pem(
                read(cert, "--cert")?,
                read(key, "--key")?,
            ));
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| format!("TLS setup: {e}"))?;
    } else if args.ca.is_some() || args.cert.is_some() {
        return Err("--ca/--cert need a grpcs:// --server".into());
    }
    endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.server))
}

/// The request the arguments describe.
fn request(args: &QueryArgs) -> Result<QueryEventStreamsRequest, String> {
    let since = match &args.since {
        None => None,
        Some(s) => {
            let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|e| format!("--since {s:?} is not an RFC 3339 time: {e}"))?;
            Some(prost_types::Timestamp {
                seconds: t.unix_timestamp(),
                nanos: t.nanosecond() as i32,
            })
        }
    };
    let seq = |v: Option<i64>, flag: &str| match v {
        Some(n) if n < 1 => Err(format!("{flag} must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(0),
    };
    Ok(QueryEventStreamsRequest {
        build_id_pattern: args.pattern.clone(),
        instance_name: args.instance.clone().unwrap_or_default(),
        event_kinds: args.kinds.clone(),
        min_sequence_number: seq(args.from_seq, "--from-seq")?,
        max_sequence_number: seq(args.to_seq, "--to-seq")?,
        since,
        until: None,
        skip_empty_streams: !args.kinds.is_empty()
            || args.from_seq.is_some()
            || args.to_seq.is_some()
            || args.since.is_some(),
    })
}

async fn query(args: QueryArgs) -> Result<(), String> {
    let req = request(&args)?;
    let request = authorized(&args.connect, req)?;
    let channel = connect(&args.connect).await?;
    let mut client = BuildEventsClient::new(channel).max_decoding_message_size(64 << 20);
    let status = status_text;
    let mut stream = client
        .query_event_streams(request)
        .await
        .map_err(status)?
        .into_inner();
    let mut streams = 0;
    let mut current: Vec<EventStreamChunk> = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(status)? {
        if !args.json {
            if current.is_empty() {
                print_header(&chunk);
            }
            for e in &chunk.events {
                println!("  {}", describe(e));
            }
        }
        let complete = chunk.stream_complete;
        current.push(chunk);
        if complete {
            streams += 1;
            if args.json {
                println!("{}", stream_json(&current));
            }
            current.clear();
        }
    }
    if !args.json {
        println!("{streams} stream(s)");
    }
    Ok(())
}

fn print_header(c: &EventStreamChunk) {
    let id = c.stream_id.clone().unwrap_or_default();
    println!(
        "stream build_id={} invocation_id={} component={} instance={:?}{}",
        id.build_id,
        if id.invocation_id.is_empty() {
            "-"
        } else {
            &id.invocation_id
        },
        component_name(id.component),
        c.instance_name,
        if c.stream_finished { " (finished)" } else { "" }
    );
}

/// The RFC 3339 form of an event's time.
fn event_time(e: &OrderedBuildEvent) -> Option<String> {
    let t = e.event.as_ref()?.event_time.as_ref()?;
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    let dt = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?;
    dt.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// The kind of an event and a short detail.
fn kind_and_detail(e: &OrderedBuildEvent) -> (&'static str, String) {
    use build_event::Event as E;
    let Some(ev) = e.event.as_ref().and_then(|b| b.event.as_ref()) else {
        return ("none", String::new());
    };
    let kind = super::event::EventKind::of(ev).name();
    let detail = match ev {
        E::BazelEvent(a) | E::BuildExecutionEvent(a) | E::SourceFetchEvent(a) | E::BuckEvent(a) => {
            format!("{} ({} bytes)", a.type_url, a.value.len())
        }
        E::ConsoleOutput(c) => match &c.output {
            Some(build_event::console_output::Output::TextOutput(t)) => {
                let short: String = t.chars().take(120).collect();
                format!("{short:?}")
            }
            Some(build_event::console_output::Output::BinaryOutput(b)) => {
                format!("{} bytes", b.len())
            }
            None => String::new(),
        },
        E::BuildFinished(f) => format!("result {}", f.status.as_ref().map_or(0, |s| s.result)),
        E::InvocationAttemptFinished(f) => format!(
            "result {}",
            f.invocation_status.as_ref().map_or(0, |s| s.result)
        ),
        _ => String::new(),
    };
    (kind, detail)
}

fn describe(e: &OrderedBuildEvent) -> String {
    let (kind, detail) = kind_and_detail(e);
    format!(
        "#{:<5} {}  {kind}  {detail}",
        e.sequence_number,
        event_time(e).unwrap_or_else(|| "-".into())
    )
}

fn stream_json(chunks: &[EventStreamChunk]) -> serde_json::Value {
    let first = chunks.first().cloned().unwrap_or_default();
    let id = first.stream_id.unwrap_or_default();
    let events: Vec<serde_json::Value> = chunks
        .iter()
        .flat_map(|c| &c.events)
        .map(|e| {
            let (kind, detail) = kind_and_detail(e);
            serde_json::json!({
                "sequence_number": e.sequence_number,
                "event_time": event_time(e),
                "kind": kind,
                "detail": detail,
                "bytes": e.encoded_len(),
            })
        })
        .collect();
    serde_json::json!({
        "build_id": id.build_id,
        "invocation_id": id.invocation_id,
        "component": component_name(id.component),
        "instance": first.instance_name,
        "finished": first.stream_finished,
        "events": events,
    })
}
