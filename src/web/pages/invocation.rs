//! `/invocation/<id>`: one invocation as people look at it after a build.
//!
//! In order: the header (state, command, patterns, who, where, when, exit
//! code, metadata); failed and flaky tests with the log of their failing
//! attempt; every test; the targets, failures first, filtered by the form
//! above them (a GET form: it works without JavaScript) and paged; action
//! failures with their stderr; the console output with its colours; the
//! command line (as redacted when stored); build metrics.

use std::collections::HashMap;

use maud::{html, Markup};

use super::{ansi, duration, maybe_link, q, state, status_class, when};
use crate::proto::gridgate::v1 as gg;

/// Targets per page of the targets table.
pub const TARGETS_PER_PAGE: usize = 200;
/// Failed or flaky tests shown with their log inline.
pub const INLINE_LOGS: usize = 10;

/// The targets table's filter, from the query string.
#[derive(Debug, Default, Clone)]
pub struct TargetFilter {
    /// Only labels containing this.
    pub text: String,
    /// `all`, `failed`, `succeeded`, `tests`.
    pub status: String,
    /// Page of the targets table, from 0.
    pub page: usize,
    /// Page of the tests table, from 0.
    pub tests_page: usize,
}

impl TargetFilter {
    fn accepts(&self, t: &gg::Target) -> bool {
        let status_ok = match self.status.as_str() {
            "failed" => failed(t),
            "succeeded" => t.completed && t.success && !failed(t),
            "tests" => t.test.is_some(),
            _ => true,
        };
        status_ok && (self.text.is_empty() || t.label.contains(self.text.as_str()))
    }
}

/// A blob's text fetched for the page (a log tail), by URI.
pub type Snippets = HashMap<String, Snippet>;

/// Text of a blob shown inline.
pub struct Snippet {
    /// The text (a tail when `truncated`).
    pub text: String,
    /// Whether only the end is shown.
    pub truncated: bool,
}

/// What the page is made from.
pub struct View<'a> {
    /// The invocation's summary (header, tests, failures, metrics).
    pub inv: &'a gg::Invocation,
    /// Every target, in label order.
    pub targets: &'a [gg::Target],
    /// The target filter from the query string.
    pub filter: &'a TargetFilter,
    /// Test logs and action stderr fetched from the CAS.
    pub snippets: &'a Snippets,
    /// The end of the console output, and the offset it starts at.
    pub console: &'a str,
    /// The byte offset of `console` in the whole console output.
    pub console_from: i64,
}

fn test_status(t: &gg::Target) -> &str {
    t.test.as_ref().map_or("", |x| x.status.as_str())
}

fn failed(t: &gg::Target) -> bool {
    (t.completed && !t.success)
        || !t.aborted_reason.is_empty()
        || !matches!(test_status(t), "" | "PASSED" | "FLAKY")
}

/// Failures first, then flaky, then the rest; by label within each.
fn rank(t: &gg::Target) -> u8 {
    if failed(t) {
        0
    } else if test_status(t) == "FLAKY" {
        1
    } else {
        2
    }
}

fn target_status(t: &gg::Target) -> (String, &'static str) {
    let s = test_status(t);
    if !s.is_empty() {
        return (s.to_string(), status_class(s));
    }
    if !t.aborted_reason.is_empty() {
        return (t.aborted_reason.clone(), "failed");
    }
    match (t.completed, t.success) {
        (true, true) => ("BUILT".into(), "ok"),
        (true, false) => ("FAILED".into(), "failed"),
        _ if t.configured => ("CONFIGURED".into(), "neutral"),
        _ => ("PENDING".into(), "neutral"),
    }
}

/// The page link of a blob URI, when it is one of gridgate's CAS blobs.
pub fn blob_link(uri: &str) -> Option<String> {
    uri.starts_with("bytestream://")
        .then(|| format!("/blob?uri={}", q(uri)))
}

fn log_link(uri: &str, label: &str) -> Markup {
    html! {
        @if let Some(link) = blob_link(uri) {
            a href=(link) { (label) }
        } @else if !uri.is_empty() {
            span.muted title=(uri) { (label) " (not in gridgate's CAS)" }
        }
    }
}

fn snippet(snippets: &Snippets, uri: &str) -> Markup {
    html! {
        @if let Some(s) = snippets.get(uri) {
            @if s.truncated { p.muted { "… the end of the log:" } }
            pre.log { (ansi::render(&s.text)) }
        }
    }
}

fn sorted(m: &HashMap<String, String>) -> Vec<(&String, &String)> {
    let mut v: Vec<_> = m.iter().collect();
    v.sort();
    v
}

fn header(inv: &gg::Invocation) -> Markup {
    let (state_name, class) = state(inv.state());
    let title = format!("bazel {} {}", inv.command, inv.patterns.join(" "));
    let counts = inv.counts.unwrap_or_default();
    html! {
        section.header {
            h1 {
                span class={"badge " (class)} id="state" { (state_name) }
                " "
                span.cmd { (title) }
            }
            dl.facts {
                dt { "Invocation" } dd.mono { (inv.invocation_id) }
                dt { "Instance" } dd { (if inv.instance_name.is_empty() { "(unnamed)" } else { &inv.instance_name }) }
                dt { "User" } dd { (inv.user) }
                dt { "Host" } dd { (inv.host) }
                dt { "Bazel" } dd { (inv.bazel_version) }
                dt { "Started" } dd { (when(inv.start_time_millis)) }
                dt { "Duration" } dd { (duration(inv.duration_millis)) }
                dt { "Exit code" } dd {
                    @if inv.exit_code_name.is_empty() { "—" } @else {
                        (inv.exit_code_name) " (" (inv.exit_code) ")"
                    }
                }
                @if !inv.publisher.is_empty() {
                    dt { "Published by" } dd { (inv.publisher) }
                }
                @for (k, v) in sorted(&inv.build_metadata) {
                    dt { (k) } dd { (maybe_link(v)) }
                }
            }
            p.summary {
                (counts.targets) " targets"
                @if counts.targets_failed > 0 { ", " span.failed-text { (counts.targets_failed) " failed" } }
                " · " (counts.tests) " tests: " (counts.tests_passed) " passed"
                @if counts.tests_failed > 0 { ", " span.failed-text { (counts.tests_failed) " failed" } }
                @if counts.tests_flaky > 0 { ", " span.warn-text { (counts.tests_flaky) " flaky" } }
                @if counts.action_failures > 0 { " · " (counts.action_failures) " action failures" }
            }
        }
    }
}

fn problem_tests(v: &View<'_>) -> Markup {
    let mut tests: Vec<&gg::Target> = v
        .targets
        .iter()
        .filter(|t| t.test.is_some() && rank(t) < 2 && !test_status(t).is_empty())
        .collect();
    tests.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.label.cmp(&b.label)));
    html! {
        @if !tests.is_empty() {
            section #problems {
                h2 { "Failed and flaky tests" }
                @for (i, t) in tests.iter().enumerate() {
                    @let info = t.test.clone().unwrap_or_default();
                    @let first_bad = info.runs.iter().find(|r| r.status != "PASSED");
                    details.test open[i < INLINE_LOGS] {
                        summary {
                            span class={"badge " (status_class(&info.status))} { (info.status) }
                            " " span.label { (t.label) }
                            span.muted { " " (info.runs.len()) " attempts · " (duration(info.total_run_duration_millis)) }
                        }
                        table.runs {
                            thead { tr { th { "Run" } th { "Shard" } th { "Attempt" } th { "Status" } th { "Duration" } th { "Log" } } }
                            tbody {
                                @for r in &info.runs {
                                    tr {
                                        td { (r.run) } td { (r.shard) } td { (r.attempt) }
                                        td { span class={"badge " (status_class(&r.status))} { (r.status) } }
                                        td { (duration(r.duration_millis)) }
                                        td { (log_link(&r.test_log_uri, "test.log")) }
                                    }
                                }
                            }
                        }
                        @if let Some(r) = first_bad {
                            @if i < INLINE_LOGS { (snippet(v.snippets, &r.test_log_uri)) }
                        }
                    }
                }
            }
        }
    }
}

fn all_tests(v: &View<'_>) -> Markup {
    let mut tests: Vec<&gg::Target> = v.targets.iter().filter(|t| t.test.is_some()).collect();
    tests.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.label.cmp(&b.label)));
    let total = tests.len();
    let pages = total.div_ceil(TARGETS_PER_PAGE).max(1);
    let page = v.filter.tests_page.min(pages - 1);
    let f = v.filter;
    let link = |p: usize| {
        format!(
            "?target={}&status={}&target_page={}&test_page={p}#tests",
            q(&f.text),
            q(&f.status),
            f.page
        )
    };
    html! {
        @if total > 0 {
            section #tests {
                h2 { "Tests (" (total) ")" }
                table.grid {
                    thead { tr { th { "Test" } th { "Status" } th { "Runs" } th { "Shards" } th { "Cached" } th { "Size" } th { "Duration" } } }
                    tbody {
                        @for t in tests.iter().skip(page * TARGETS_PER_PAGE).take(TARGETS_PER_PAGE) {
                            @let info = t.test.clone().unwrap_or_default();
                            tr {
                                td.label { (t.label) }
                                td { span class={"badge " (status_class(&info.status))} { (if info.status.is_empty() { "PENDING" } else { &info.status }) } }
                                td { (info.runs.len()) }
                                td { (info.shard_count.max(1)) }
                                td { (info.total_num_cached) }
                                td { (info.size) }
                                td { (duration(info.total_run_duration_millis)) }
                            }
                        }
                    }
                }
                @if pages > 1 {
                    nav.pager {
                        @if page > 0 { a href=(link(page - 1)) { "← previous" } " " }
                        "page " (page + 1) " of " (pages)
                        @if page + 1 < pages { " " a href=(link(page + 1)) { "next →" } }
                    }
                }
            }
        }
    }
}

fn targets(v: &View<'_>) -> Markup {
    let f = v.filter;
    let mut shown: Vec<&gg::Target> = v.targets.iter().filter(|t| f.accepts(t)).collect();
    shown.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.label.cmp(&b.label)));
    let total = shown.len();
    let pages = total.div_ceil(TARGETS_PER_PAGE).max(1);
    let page = f.page.min(pages - 1);
    let rows = shown
        .into_iter()
        .skip(page * TARGETS_PER_PAGE)
        .take(TARGETS_PER_PAGE);
    let link = |p: usize| {
        format!(
            "?target={}&status={}&target_page={p}&test_page={}#targets",
            q(&f.text),
            q(&f.status),
            f.tests_page
        )
    };
    html! {
        section #targets {
            h2 { "Targets (" (v.targets.len()) ")" }
            form.filter method="get" action="#targets" {
                input type="search" name="target" placeholder="label contains…" value=(f.text);
                select name="status" {
                    @for (value, name) in [("all", "All"), ("failed", "Failed"), ("succeeded", "Succeeded"), ("tests", "Tests")] {
                        option value=(value) selected[f.status == value] { (name) }
                    }
                }
                button type="submit" { "Filter" }
                span.muted { " " (total) " shown" }
            }
            table.grid {
                thead { tr { th { "Target" } th { "Kind" } th { "Status" } th { "Why" } } }
                tbody {
                    @for t in rows {
                        @let (status, class) = target_status(t);
                        tr {
                            td.label { (t.label) }
                            td.muted { (t.kind) }
                            td { span class={"badge " (class)} { (status) } }
                            td {
                                (t.failure_message)
                                @if !t.root_causes.is_empty() {
                                    span.muted { " root cause: " (t.root_causes.join(", ")) }
                                }
                            }
                        }
                    }
                }
            }
            @if pages > 1 {
                nav.pager {
                    @if page > 0 { a href=(link(page - 1)) { "← previous" } " " }
                    "page " (page + 1) " of " (pages)
                    @if page + 1 < pages { " " a href=(link(page + 1)) { "next →" } }
                }
            }
        }
    }
}

fn action_failures(v: &View<'_>) -> Markup {
    let failures: Vec<&gg::ActionFailure> = v
        .targets
        .iter()
        .flat_map(|t| t.action_failures.iter())
        .collect();
    html! {
        @if !failures.is_empty() {
            section #actions {
                h2 { "Action failures (" (failures.len()) ")" }
                @for (i, a) in failures.iter().enumerate() {
                    details.action open[i < INLINE_LOGS] {
                        summary {
                            span.badge.failed { (a.mnemonic) }
                            " " span.label { (a.label) }
                            span.muted { " exit code " (a.exit_code) }
                        }
                        @if !a.failure_message.is_empty() { p { (a.failure_message) } }
                        p { (log_link(&a.stderr_uri, "stderr")) " " (log_link(&a.stdout_uri, "stdout")) }
                        @if i < INLINE_LOGS { (snippet(v.snippets, &a.stderr_uri)) }
                    }
                }
            }
        }
    }
}

fn console(v: &View<'_>) -> Markup {
    let inv = v.inv;
    html! {
        section #console {
            h2 { "Console output" }
            @if v.console_from > 0 {
                p.muted { "The last " (v.console.len()) " bytes of " (inv.counts.as_ref().map_or(0, |c| c.log_bytes)) "; "
                    a href={"/invocation/" (q(&inv.invocation_id)) "/log?instance=" (q(&inv.instance_name))} { "the whole output" } }
            }
            pre.log.console { (ansi::render(v.console)) }
        }
    }
}

fn command_line(inv: &gg::Invocation) -> Markup {
    html! {
        section #command {
            h2 { "Command line" }
            pre.cmdline { (inv.command_line.join(" ")) }
            dl.facts {
                dt { "Patterns" } dd { (inv.patterns.join(" ")) }
                dt { "Workspace" } dd.mono { (inv.workspace_directory) }
                dt { "Keywords" } dd { (inv.keywords.join(", ")) }
                dt { "Build id" } dd.mono { (inv.build_id) }
            }
        }
    }
}

fn metrics(inv: &gg::Invocation) -> Markup {
    html! {
        @if let Some(m) = &inv.metrics {
            section #metrics {
                h2 { "Build metrics" }
                table.grid.narrow {
                    tbody {
                        tr { th { "Actions created" } td { (m.actions_created) } }
                        tr { th { "Actions executed" } td { (m.actions_executed) } }
                        tr { th { "Action cache hits / misses" } td { (m.action_cache_hits) " / " (m.action_cache_misses) } }
                        tr { th { "Remote cache hits" } td { (m.remote_cache_hits) } }
                        tr { th { "Targets configured" } td { (m.targets_configured) } }
                        tr { th { "Packages loaded" } td { (m.packages_loaded) } }
                        tr { th { "Wall time" } td { (duration(m.wall_time_millis)) } }
                        tr { th { "CPU time" } td { (duration(m.cpu_time_millis)) } }
                    }
                }
            }
        }
    }
}

/// The page's content (inside the layout).
pub fn render(v: &View<'_>) -> Markup {
    html! {
        (header(v.inv))
        (problem_tests(v))
        (action_failures(v))
        (all_tests(v))
        (targets(v))
        (console(v))
        (command_line(v.inv))
        (metrics(v.inv))
    }
}

/// The URIs whose text the page shows inline: the failing attempt's log of
/// the first failed or flaky tests, the stderr of the first action failures.
pub fn inline_uris(targets: &[gg::Target]) -> Vec<String> {
    let mut tests: Vec<&gg::Target> = targets
        .iter()
        .filter(|t| t.test.is_some() && rank(t) < 2 && !test_status(t).is_empty())
        .collect();
    tests.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.label.cmp(&b.label)));
    let mut out: Vec<String> = tests
        .iter()
        .take(INLINE_LOGS)
        .filter_map(|t| {
            t.test
                .as_ref()?
                .runs
                .iter()
                .find(|r| r.status != "PASSED")
                .map(|r| r.test_log_uri.clone())
        })
        .collect();
    out.extend(
        targets
            .iter()
            .flat_map(|t| t.action_failures.iter())
            .take(INLINE_LOGS)
            .map(|a| a.stderr_uri.clone()),
    );
    out.retain(|u| u.starts_with("bytestream://"));
    out.dedup();
    out
}
