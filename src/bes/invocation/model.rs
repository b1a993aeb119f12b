//! The invocation model: what a batch of newly stored events changes in its
//! invocation (summary, targets and tests, console output), computed from
//! their [`Fact`]s and the stored state they touch.
//!
//! Stores call [`apply`] inside the transaction that stores the events and
//! write the [`Update`] it returns in that same transaction, so an invocation
//! never disagrees with its events: both or neither are committed.
//!
//! An invocation is identified by its instance and invocation id: its tool
//! stream (the `bazel_event`s) and its CONTROLLER stream (the attempt's
//! lifecycle events) feed the same invocation. The build-level stream (no
//! invocation id) feeds none.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use super::decode::Fact;
use crate::bes::event::{Prepared, StreamKey};
use crate::proto::gridgate::v1 as gg;
use gg::InvocationState as State;

/// Runs of one test kept on its target (attempts × shards × runs beyond this
/// are counted by Bazel's summary but not listed).
const MAX_RUNS: usize = 1000;
/// Action failures kept on one target.
const MAX_ACTION_FAILURES: usize = 100;
/// Bazel's exit code for an interrupted build.
const EXIT_INTERRUPTED: i32 = 8;

/// Which invocation: (instance, invocation id).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InvocationKey {
    /// The instance its streams belong to.
    pub instance: String,
    /// Bazel's invocation id.
    pub invocation_id: String,
}

impl InvocationKey {
    /// The invocation a stream feeds; none for the build-level stream.
    pub fn of(stream: &StreamKey) -> Option<InvocationKey> {
        (!stream.invocation_id.is_empty()).then(|| InvocationKey {
            instance: stream.instance.clone(),
            invocation_id: stream.invocation_id.clone(),
        })
    }
}

/// Who published a call's events (known per call, not per event).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Publisher {
    /// The verified identity's actor or subject ("" without credentials).
    pub identity: String,
    /// The request's `notification_keywords` (`--bes_keywords` and Bazel's own).
    pub keywords: Vec<String>,
}

/// What a batch changed, to be written with its events.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The invocation.
    pub key: InvocationKey,
    /// Its summary after the batch.
    pub invocation: gg::Invocation,
    /// Its start time before the batch, when it existed (stores index by it).
    pub previous_start: Option<i64>,
    /// Its targets the batch changed, whole.
    pub targets: Vec<gg::Target>,
    /// New console output, at its byte offsets.
    pub log: Vec<(i64, Bytes)>,
}

/// The labels whose stored targets `apply` needs for these events.
pub fn labels<'a>(events: impl IntoIterator<Item = &'a Prepared>) -> Vec<String> {
    let mut out: Vec<String> = events
        .into_iter()
        .filter_map(|e| target_label(&e.fact))
        .map(str::to_string)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn target_label(f: &Fact) -> Option<&str> {
    match f {
        Fact::Configured { label, .. }
        | Fact::Completed { label, .. }
        | Fact::Aborted { label, .. }
        | Fact::TestResult { label, .. }
        | Fact::TestSummary { label, .. } => Some(label),
        Fact::Action(a) => Some(&a.label),
        _ => None,
    }
}

/// What one target adds to its invocation's counts.
#[derive(Default, Clone, Copy)]
struct Contribution {
    targets: i64,
    targets_failed: i64,
    tests: i64,
    tests_passed: i64,
    tests_failed: i64,
    tests_flaky: i64,
    action_failures: i64,
}

fn contribution(t: &gg::Target) -> Contribution {
    let failed = (t.completed && !t.success) || !t.aborted_reason.is_empty();
    let status = t.test.as_ref().map(|x| x.status.as_str());
    let summarized = status.is_some_and(|s| !s.is_empty());
    Contribution {
        targets: 1,
        targets_failed: i64::from(failed),
        tests: i64::from(summarized),
        tests_passed: i64::from(status == Some("PASSED")),
        tests_failed: i64::from(summarized && !matches!(status, Some("PASSED") | Some("FLAKY"))),
        tests_flaky: i64::from(status == Some("FLAKY")),
        action_failures: t.action_failures.len() as i64,
    }
}

fn add(counts: &mut gg::Counts, c: Contribution, sign: i64) {
    counts.targets += sign * c.targets;
    counts.targets_failed += sign * c.targets_failed;
    counts.tests += sign * c.tests;
    counts.tests_passed += sign * c.tests_passed;
    counts.tests_failed += sign * c.tests_failed;
    counts.tests_flaky += sign * c.tests_flaky;
    counts.action_failures += sign * c.action_failures;
}

/// The state an exit code means.
fn state_of_exit(code: i32) -> State {
    match code {
        0 => State::Succeeded,
        EXIT_INTERRUPTED => State::Interrupted,
        _ => State::Failed,
    }
}

/// Applies newly stored `events` (in sequence order, all of `stream`) to the
/// stored invocation and the stored targets they touch (those [`labels`]
/// names; missing ones are new). None when the stream feeds no invocation.
pub fn apply<'a>(
    stream: &StreamKey,
    stored: Option<gg::Invocation>,
    mut targets: HashMap<String, gg::Target>,
    events: impl IntoIterator<Item = &'a Prepared>,
) -> Option<Update> {
    let key = InvocationKey::of(stream)?;
    let previous_start = stored.as_ref().map(|i| i.start_time_millis);
    let mut inv = stored.unwrap_or_else(|| gg::Invocation {
        invocation_id: key.invocation_id.clone(),
        build_id: stream.build_id.clone(),
        instance_name: key.instance.clone(),
        ..Default::default()
    });
    let mut counts = inv.counts.take().unwrap_or_default();
    let mut before: BTreeMap<String, Contribution> = BTreeMap::new();
    let mut log = Vec::new();
    let mut finished = !inv.exit_code_name.is_empty() || inv.finish_time_millis != 0;
    for e in events {
        counts.events += 1;
        let millis = e.time_micros.map(|t| t / 1000);
        if let Some(m) = millis {
            inv.last_event_millis = inv.last_event_millis.max(m);
            if inv.start_time_millis == 0 {
                inv.start_time_millis = m;
            }
        }
        if let Some(p) = &e.publisher {
            if inv.publisher.is_empty() {
                inv.publisher.clone_from(&p.identity);
            }
            if inv.keywords.is_empty() && !p.keywords.is_empty() {
                inv.keywords.clone_from(&p.keywords);
            }
        }
        // A stream that speaks again is running again, even if it was
        // marked abandoned while silent.
        if !finished
            && matches!(
                inv.state(),
                State::Unspecified | State::Abandoned | State::Running
            )
        {
            inv.set_state(State::Running);
        }
        if let Some(label) = target_label(&e.fact) {
            if !before.contains_key(label) {
                // What the target counted for before this batch (nothing if new).
                let was = targets.get(label).map(contribution).unwrap_or_default();
                before.insert(label.to_string(), was);
            }
        }
        match &e.fact {
            Fact::Nothing => {}
            Fact::Undecodable => counts.undecodable_events += 1,
            Fact::AttemptStarted => {
                if let Some(m) = millis {
                    if previous_start.is_none_or(|s| s == 0) && inv.start_time_millis == 0 {
                        inv.start_time_millis = m;
                    }
                }
            }
            Fact::AttemptFinished { result } => {
                if !finished {
                    finished = true;
                    // BuildStatus.Result: 1 COMMAND_SUCCEEDED, 7 CANCELLED.
                    inv.set_state(match result {
                        1 => State::Succeeded,
                        7 => State::Interrupted,
                        _ => State::Failed,
                    });
                    if let Some(m) = millis {
                        inv.finish_time_millis = m;
                    }
                }
            }
            Fact::Started {
                uuid,
                command,
                version,
                start_millis,
                workspace,
            } => {
                if !uuid.is_empty() && inv.invocation_id.is_empty() {
                    inv.invocation_id.clone_from(uuid);
                }
                inv.command.clone_from(command);
                inv.bazel_version.clone_from(version);
                inv.workspace_directory.clone_from(workspace);
                if *start_millis > 0 {
                    inv.start_time_millis = *start_millis;
                }
            }
            Fact::Patterns(p) => inv.patterns.extend(p.iter().cloned()),
            Fact::CommandLine(words) => inv.command_line.clone_from(words),
            Fact::WorkspaceStatus { user, host } => {
                if let Some(u) = user {
                    inv.user.clone_from(u);
                }
                if let Some(h) = host {
                    inv.host.clone_from(h);
                }
            }
            Fact::Metadata(pairs) => {
                inv.build_metadata.extend(pairs.iter().cloned());
            }
            Fact::Configured {
                label,
                kind,
                test_size,
            } => {
                let t = targets.entry(label.clone()).or_default();
                t.label.clone_from(label);
                t.kind.clone_from(kind);
                t.configured = true;
                if !test_size.is_empty() || kind.ends_with("_test rule") || kind.ends_with("_test")
                {
                    t.test
                        .get_or_insert_with(Default::default)
                        .size
                        .clone_from(test_size);
                }
            }
            Fact::Completed {
                label,
                success,
                failure_message,
                root_causes,
            } => {
                let t = targets.entry(label.clone()).or_default();
                t.label.clone_from(label);
                t.completed = true;
                t.success = *success;
                t.failure_message.clone_from(failure_message);
                t.root_causes.clone_from(root_causes);
            }
            Fact::Aborted {
                label,
                reason,
                description,
            } => {
                let t = targets.entry(label.clone()).or_default();
                t.label.clone_from(label);
                t.aborted_reason.clone_from(reason);
                if t.failure_message.is_empty() {
                    t.failure_message.clone_from(description);
                }
            }
            Fact::Action(a) => {
                let t = targets.entry(a.label.clone()).or_default();
                t.label.clone_from(&a.label);
                if t.action_failures.len() < MAX_ACTION_FAILURES {
                    t.action_failures.push(a.clone());
                }
            }
            Fact::TestResult { label, run } => {
                let t = targets.entry(label.clone()).or_default();
                t.label.clone_from(label);
                let test = t.test.get_or_insert_with(Default::default);
                if test.runs.len() < MAX_RUNS {
                    test.runs.push(run.clone());
                }
            }
            Fact::TestSummary { label, summary } => {
                let t = targets.entry(label.clone()).or_default();
                t.label.clone_from(label);
                let test = t.test.get_or_insert_with(Default::default);
                let runs = std::mem::take(&mut test.runs);
                let size = std::mem::take(&mut test.size);
                *test = summary.clone();
                if test.shard_count == 0 {
                    // Bazel before 4 does not report shards in the summary:
                    // count them in the runs.
                    let mut shards: Vec<i32> = runs.iter().map(|r| r.shard).collect();
                    shards.sort_unstable();
                    shards.dedup();
                    if shards.len() > 1 {
                        test.shard_count = shards.len() as i32;
                    }
                }
                test.runs = runs;
                test.size = size;
            }
            Fact::Progress(text) => {
                log.push((counts.log_bytes, Bytes::from(text.clone().into_bytes())));
                counts.log_bytes += text.len() as i64;
            }
            Fact::Finished {
                code,
                name,
                finish_millis,
            } => {
                finished = true;
                inv.exit_code = *code;
                inv.exit_code_name.clone_from(name);
                inv.set_state(state_of_exit(*code));
                if *finish_millis > 0 {
                    inv.finish_time_millis = *finish_millis;
                } else if let Some(m) = millis {
                    inv.finish_time_millis = m;
                }
            }
            Fact::Metrics(m) => inv.metrics = Some(*m),
        }
    }
    if inv.finish_time_millis > 0 && inv.start_time_millis > 0 {
        inv.duration_millis = (inv.finish_time_millis - inv.start_time_millis).max(0);
    }
    let mut changed = Vec::with_capacity(before.len());
    for (label, was) in before {
        if let Some(t) = targets.remove(&label) {
            add(&mut counts, was, -1);
            add(&mut counts, contribution(&t), 1);
            changed.push(t);
        }
    }
    inv.counts = Some(counts);
    Some(Update {
        key,
        invocation: inv,
        previous_start,
        targets: changed,
        log,
    })
}

/// Marks an invocation that is still running as abandoned (its stream went
/// silent without a finish); false when it is not running.
pub fn abandon(inv: &mut gg::Invocation) -> bool {
    if inv.state() == State::Running {
        inv.set_state(State::Abandoned);
        true
    } else {
        false
    }
}
