//! `/api/v1/…`: the data of `gridgate.v1.Invocations` as plain JSON, for
//! scripts. The answers are the service's own (the same calls, the same
//! authorization), written in the proto3 JSON mapping: lowerCamelCase field
//! names, enums by name, bytes (the log's `data`) in base64, every field
//! present; 64-bit integers are JSON numbers (they are times, sizes and
//! counts, far below 2^53).
//!
//! | path | RPC |
//! |---|---|
//! | `GET /api/v1/invocations?instance=&user=&state=&command=&pattern=&metadata=K=V&startedAfter=&startedBefore=&buildId=&pageSize=&pageToken=` | `ListInvocations` |
//! | `GET /api/v1/invocations/<id>?instance=&pageSize=&pageToken=` | `GetInvocation` (without `instance`: the instance of that id the caller may query) |
//! | `GET /api/v1/invocations/<id>/log?instance=&offset=&limit=` | `GetLog` |

use base64::Engine;
use serde_json::{json, Map, Value};

use crate::proto::gridgate::v1 as gg;

fn state_name(s: i32) -> &'static str {
    gg::InvocationState::try_from(s)
        .unwrap_or(gg::InvocationState::Unspecified)
        .as_str_name()
}

/// An `Invocation`.
pub(super) fn invocation(i: &gg::Invocation) -> Value {
    let metadata: Map<String, Value> = i
        .build_metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "invocationId": i.invocation_id,
        "buildId": i.build_id,
        "instanceName": i.instance_name,
        "publisher": i.publisher,
        "command": i.command,
        "patterns": i.patterns,
        "user": i.user,
        "host": i.host,
        "bazelVersion": i.bazel_version,
        "startTimeMillis": i.start_time_millis,
        "finishTimeMillis": i.finish_time_millis,
        "durationMillis": i.duration_millis,
        "state": state_name(i.state),
        "exitCode": i.exit_code,
        "exitCodeName": i.exit_code_name,
        "buildMetadata": metadata,
        "keywords": i.keywords,
        "commandLine": i.command_line,
        "metrics": i.metrics.as_ref().map(metrics),
        "lastEventMillis": i.last_event_millis,
        "counts": i.counts.as_ref().map(counts),
        "workspaceDirectory": i.workspace_directory,
    })
}

fn metrics(m: &gg::Metrics) -> Value {
    json!({
        "actionsCreated": m.actions_created,
        "actionsExecuted": m.actions_executed,
        "actionCacheHits": m.action_cache_hits,
        "actionCacheMisses": m.action_cache_misses,
        "remoteCacheHits": m.remote_cache_hits,
        "targetsConfigured": m.targets_configured,
        "packagesLoaded": m.packages_loaded,
        "wallTimeMillis": m.wall_time_millis,
        "cpuTimeMillis": m.cpu_time_millis,
    })
}

fn counts(c: &gg::Counts) -> Value {
    json!({
        "targets": c.targets,
        "targetsFailed": c.targets_failed,
        "tests": c.tests,
        "testsFailed": c.tests_failed,
        "testsFlaky": c.tests_flaky,
        "actionFailures": c.action_failures,
        "logBytes": c.log_bytes,
        "events": c.events,
        "undecodableEvents": c.undecodable_events,
        "testsPassed": c.tests_passed,
    })
}

/// A `Target`.
pub(super) fn target(t: &gg::Target) -> Value {
    json!({
        "label": t.label,
        "kind": t.kind,
        "configured": t.configured,
        "completed": t.completed,
        "success": t.success,
        "failureMessage": t.failure_message,
        "rootCauses": t.root_causes,
        "abortedReason": t.aborted_reason,
        "test": t.test.as_ref().map(test),
        "actionFailures": t.action_failures.iter().map(action_failure).collect::<Vec<_>>(),
    })
}

fn test(t: &gg::TestInfo) -> Value {
    json!({
        "status": t.status,
        "totalRunCount": t.total_run_count,
        "runCount": t.run_count,
        "shardCount": t.shard_count,
        "totalNumCached": t.total_num_cached,
        "totalRunDurationMillis": t.total_run_duration_millis,
        "runs": t.runs.iter().map(run).collect::<Vec<_>>(),
        "size": t.size,
    })
}

fn run(r: &gg::TestRun) -> Value {
    json!({
        "run": r.run,
        "shard": r.shard,
        "attempt": r.attempt,
        "status": r.status,
        "startTimeMillis": r.start_time_millis,
        "durationMillis": r.duration_millis,
        "cached": r.cached,
        "testLogUri": r.test_log_uri,
        "testXmlUri": r.test_xml_uri,
        "statusDetails": r.status_details,
    })
}

fn action_failure(a: &gg::ActionFailure) -> Value {
    json!({
        "mnemonic": a.mnemonic,
        "label": a.label,
        "exitCode": a.exit_code,
        "stdoutUri": a.stdout_uri,
        "stderrUri": a.stderr_uri,
        "primaryOutput": a.primary_output,
        "failureMessage": a.failure_message,
    })
}

/// A `ListInvocationsResponse`.
pub(super) fn list(r: &gg::ListInvocationsResponse) -> Value {
    json!({
        "invocations": r.invocations.iter().map(invocation).collect::<Vec<_>>(),
        "nextPageToken": r.next_page_token,
    })
}

/// A `GetInvocationResponse`.
pub(super) fn get(r: &gg::GetInvocationResponse) -> Value {
    json!({
        "invocation": r.invocation.as_ref().map(invocation),
        "targets": r.targets.iter().map(target).collect::<Vec<_>>(),
        "nextPageToken": r.next_page_token,
    })
}

/// A `GetLogResponse`.
pub(super) fn log(r: &gg::GetLogResponse) -> Value {
    json!({
        "data": base64::engine::general_purpose::STANDARD.encode(&r.data),
        "offset": r.offset,
        "nextOffset": r.next_offset,
        "complete": r.complete,
    })
}

/// An error, as `{"error": {"code", "status", "message"}}`.
pub(super) fn error(http: u16, status: &str, message: &str) -> Value {
    json!({ "error": { "code": http, "status": status, "message": message } })
}
