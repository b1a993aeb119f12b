//! `gridgate invocations list|show|log`: invocations stored in a running
//! gateway, through `gridgate.v1.Invocations`.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::bes::cli::{authorized, block_on, connect, status_text, ConnectArgs};
use crate::proto::gridgate::v1 as gg;
use gg::invocations_client::InvocationsClient;

/// `gridgate invocations ...`
#[derive(Debug, Subcommand)]
pub enum InvocationsCommand {
    /// List invocations, newest first.
    ///
    /// Only invocations of instances your credentials may QueryEventStreams on
    /// are shown. Example: gridgate invocations list --instance team-a --state failed --metadata BRANCH=main
    List(ListArgs),
    /// Show one invocation: its summary, targets and tests.
    ///
    /// Example: gridgate invocations show 5f1c0b0e-... --instance team-a
    Show(ShowArgs),
    /// Print an invocation's console output.
    Log(LogArgs),
}

/// Arguments of `gridgate invocations list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this instance (the publisher's --project_id).
    #[arg(long, value_name = "I")]
    pub instance: Option<String>,
    /// Only this BUILD_USER.
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// Only this state: running, succeeded, failed, interrupted, abandoned.
    #[arg(long, value_name = "S")]
    pub state: Option<String>,
    /// Only this Bazel command (build, test, ...).
    #[arg(long, value_name = "C")]
    pub command: Option<String>,
    /// Only invocations one of whose target patterns contains this.
    #[arg(long, value_name = "P")]
    pub pattern: Option<String>,
    /// Only invocations with this build metadata (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// Only this build id.
    #[arg(long, value_name = "B")]
    pub build_id: Option<String>,
    /// Only invocations started at or after this time (RFC 3339).
    #[arg(long, value_name = "RFC3339")]
    pub since: Option<String>,
    /// Only invocations started before this time (RFC 3339).
    #[arg(long, value_name = "RFC3339")]
    pub until: Option<String>,
    /// At most this many.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub limit: i32,
    /// Continue a previous listing (the token it printed).
    #[arg(long, value_name = "T")]
    pub page_token: Option<String>,
    /// How to reach the gateway.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON (one object per invocation per line) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `gridgate invocations show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The invocation id.
    #[arg(value_name = "INVOCATION_ID")]
    pub invocation_id: String,
    /// Its instance.
    #[arg(long, value_name = "I", default_value = "")]
    pub instance: String,
    /// How to reach the gateway.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `gridgate invocations log`.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// The invocation id.
    #[arg(value_name = "INVOCATION_ID")]
    pub invocation_id: String,
    /// Its instance.
    #[arg(long, value_name = "I", default_value = "")]
    pub instance: String,
    /// Start at this byte offset.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub offset: i64,
    /// How to reach the gateway.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON ({"offset", "next_offset", "complete", "data"}) instead of the text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `gridgate invocations ...`; returns the exit code.
pub fn run(command: InvocationsCommand) -> ExitCode {
    match command {
        InvocationsCommand::List(a) => block_on(list(a)),
        InvocationsCommand::Show(a) => block_on(show(a)),
        InvocationsCommand::Log(a) => block_on(log(a)),
    }
}

fn millis(flag: &str, s: &Option<String>) -> Result<i64, String> {
    let Some(s) = s else { return Ok(0) };
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{flag} {s:?} is not an RFC 3339 time: {e}"))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

fn state_named(s: &str) -> Result<gg::InvocationState, String> {
    let name = format!("INVOCATION_STATE_{}", s.to_ascii_uppercase());
    gg::InvocationState::from_str_name(&name)
        .filter(|s| *s != gg::InvocationState::Unspecified)
        .ok_or_else(|| {
            format!("--state {s:?}: expected running, succeeded, failed, interrupted or abandoned")
        })
}

/// `running`, `failed`, ... for people.
pub fn state_name(s: gg::InvocationState) -> String {
    s.as_str_name()
        .trim_start_matches("INVOCATION_STATE_")
        .to_ascii_lowercase()
}

fn time_text(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// An invocation's summary as JSON.
pub fn invocation_json(i: &gg::Invocation) -> Value {
    let c = i.counts.unwrap_or_default();
    let m = i.metrics.unwrap_or_default();
    json!({
        "invocation_id": i.invocation_id,
        "build_id": i.build_id,
        "instance": i.instance_name,
        "publisher": i.publisher,
        "command": i.command,
        "patterns": i.patterns,
        "user": i.user,
        "host": i.host,
        "bazel_version": i.bazel_version,
        "start_time": time_text(i.start_time_millis),
        "finish_time": time_text(i.finish_time_millis),
        "duration_millis": i.duration_millis,
        "state": state_name(i.state()),
        "exit_code": i.exit_code,
        "exit_code_name": i.exit_code_name,
        "build_metadata": i.build_metadata,
        "keywords": i.keywords,
        "command_line": i.command_line,
        "counts": {
            "targets": c.targets, "targets_failed": c.targets_failed, "tests": c.tests,
            "tests_passed": c.tests_passed, "tests_failed": c.tests_failed,
            "tests_flaky": c.tests_flaky, "action_failures": c.action_failures,
            "log_bytes": c.log_bytes, "events": c.events, "undecodable_events": c.undecodable_events,
        },
        "metrics": i.metrics.map(|_| json!({
            "actions_created": m.actions_created, "actions_executed": m.actions_executed,
            "action_cache_hits": m.action_cache_hits, "action_cache_misses": m.action_cache_misses,
            "remote_cache_hits": m.remote_cache_hits, "targets_configured": m.targets_configured,
            "packages_loaded": m.packages_loaded, "wall_time_millis": m.wall_time_millis,
            "cpu_time_millis": m.cpu_time_millis,
        })),
    })
}

/// A target as JSON.
pub fn target_json(t: &gg::Target) -> Value {
    json!({
        "label": t.label,
        "kind": t.kind,
        "configured": t.configured,
        "completed": t.completed,
        "success": t.success,
        "failure_message": t.failure_message,
        "root_causes": t.root_causes,
        "aborted_reason": t.aborted_reason,
        "test": t.test.as_ref().map(|x| json!({
            "status": x.status, "total_run_count": x.total_run_count, "run_count": x.run_count,
            "shard_count": x.shard_count, "total_num_cached": x.total_num_cached,
            "total_run_duration_millis": x.total_run_duration_millis, "size": x.size,
            "runs": x.runs.iter().map(|r| json!({
                "run": r.run, "shard": r.shard, "attempt": r.attempt, "status": r.status,
                "start_time": time_text(r.start_time_millis), "duration_millis": r.duration_millis,
                "cached": r.cached, "test_log": r.test_log_uri, "test_xml": r.test_xml_uri,
                "status_details": r.status_details,
            })).collect::<Vec<_>>(),
        })),
        "action_failures": t.action_failures.iter().map(|a| json!({
            "mnemonic": a.mnemonic, "label": a.label, "exit_code": a.exit_code,
            "stdout": a.stdout_uri, "stderr": a.stderr_uri, "primary_output": a.primary_output,
            "failure_message": a.failure_message,
        })).collect::<Vec<_>>(),
    })
}

async fn list(args: ListArgs) -> Result<(), String> {
    let req = gg::ListInvocationsRequest {
        instance_name: args.instance.clone().unwrap_or_default(),
        user: args.user.clone().unwrap_or_default(),
        state: match &args.state {
            Some(s) => state_named(s)? as i32,
            None => 0,
        },
        command: args.command.clone().unwrap_or_default(),
        pattern: args.pattern.clone().unwrap_or_default(),
        metadata: args.metadata.clone(),
        started_after_millis: millis("--since", &args.since)?,
        started_before_millis: millis("--until", &args.until)?,
        page_size: args.limit,
        page_token: args.page_token.clone().unwrap_or_default(),
        build_id: args.build_id.clone().unwrap_or_default(),
    };
    let mut client = InvocationsClient::new(connect(&args.connect).await?);
    let resp = client
        .list_invocations(authorized(&args.connect, req)?)
        .await
        .map_err(status_text)?
        .into_inner();
    for i in &resp.invocations {
        if args.json {
            println!("{}", invocation_json(i));
        } else {
            println!(
                "{}  {:<11} {:<3} {:<14} {}  {} {} {}  {}",
                time_text(i.start_time_millis),
                state_name(i.state()),
                i.exit_code,
                i.instance_name,
                i.invocation_id,
                if i.user.is_empty() { "-" } else { &i.user },
                i.command,
                i.patterns.join(" "),
                i.build_id
            );
        }
    }
    if !resp.next_page_token.is_empty() {
        if args.json {
            println!("{}", json!({ "next_page_token": resp.next_page_token }));
        } else {
            println!("more: --page-token {}", resp.next_page_token);
        }
    } else if !args.json {
        println!("{} invocation(s)", resp.invocations.len());
    }
    Ok(())
}

async fn show(args: ShowArgs) -> Result<(), String> {
    let mut client =
        InvocationsClient::new(connect(&args.connect).await?).max_decoding_message_size(64 << 20);
    let mut targets = Vec::new();
    let mut token = String::new();
    let summary = loop {
        let req = gg::GetInvocationRequest {
            instance_name: args.instance.clone(),
            invocation_id: args.invocation_id.clone(),
            page_size: 0,
            page_token: token.clone(),
        };
        let resp = client
            .get_invocation(authorized(&args.connect, req)?)
            .await
            .map_err(status_text)?
            .into_inner();
        targets.extend(resp.targets);
        if resp.next_page_token.is_empty() {
            break resp.invocation.unwrap_or_default();
        }
        token = resp.next_page_token;
    };
    if args.json {
        let mut v = invocation_json(&summary);
        v["targets"] = targets.iter().map(target_json).collect();
        println!("{v}");
        return Ok(());
    }
    let c = summary.counts.unwrap_or_default();
    println!(
        "invocation {} ({})",
        summary.invocation_id, summary.instance_name
    );
    println!(
        "  {} {}: {} (exit {} {})",
        summary.command,
        summary.patterns.join(" "),
        state_name(summary.state()),
        summary.exit_code,
        summary.exit_code_name
    );
    println!(
        "  user {} on {}, Bazel {}, started {}, {} ms",
        summary.user,
        summary.host,
        summary.bazel_version,
        time_text(summary.start_time_millis),
        summary.duration_millis
    );
    for (k, v) in &summary.build_metadata {
        println!("  metadata {k}={v}");
    }
    println!(
        "  {} targets ({} failed), {} tests ({} passed, {} failed, {} flaky)",
        c.targets, c.targets_failed, c.tests, c.tests_passed, c.tests_failed, c.tests_flaky
    );
    for t in &targets {
        let status = match &t.test {
            Some(x) if !x.status.is_empty() => x.status.clone(),
            _ if !t.aborted_reason.is_empty() => t.aborted_reason.clone(),
            _ if t.completed && t.success => "built".into(),
            _ if t.completed => "FAILED".into(),
            _ => "configured".into(),
        };
        println!("  {status:<10} {}  {}", t.label, t.kind);
        for a in &t.action_failures {
            println!(
                "             action {} exited {}: {}",
                a.mnemonic, a.exit_code, a.stderr_uri
            );
        }
    }
    Ok(())
}

async fn log(args: LogArgs) -> Result<(), String> {
    let mut client =
        InvocationsClient::new(connect(&args.connect).await?).max_decoding_message_size(8 << 20);
    let mut offset = args.offset;
    let mut out = std::io::stdout().lock();
    loop {
        let req = gg::GetLogRequest {
            instance_name: args.instance.clone(),
            invocation_id: args.invocation_id.clone(),
            offset,
            limit: 0,
        };
        let resp = client
            .get_log(authorized(&args.connect, req)?)
            .await
            .map_err(status_text)?
            .into_inner();
        if args.json {
            let line = json!({
                "offset": resp.offset,
                "next_offset": resp.next_offset,
                "complete": resp.complete,
                "data": String::from_utf8_lossy(&resp.data),
            });
            writeln!(out, "{line}").map_err(|e| e.to_string())?;
        } else {
            out.write_all(&resp.data).map_err(|e| e.to_string())?;
        }
        if resp.data.is_empty() || resp.complete {
            return Ok(());
        }
        offset = resp.next_offset;
    }
}
