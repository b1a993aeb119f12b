//! `/` and `/invocations`: the newest invocations of the instances the
//! viewer may query, filtered by a GET form and paged with the API's page
//! tokens.

use maud::{html, Markup};

use super::{duration, q, state, when};
use crate::proto::gridgate::v1 as gg;

/// The list's filters, as the query string names them.
#[derive(Debug, Default, Clone)]
pub struct Filters {
    /// `instance`: only this instance, or empty for every one the viewer may query.
    pub instance: String,
    /// `user`: the BUILD_USER the invocation reported.
    pub user: String,
    /// An [`gg::InvocationState`] name in lower case, or empty.
    pub state: String,
    /// `command`: `build`, `test`, ...
    pub command: String,
    /// `pattern`: a substring of a target pattern or label.
    pub pattern: String,
    /// `KEY=VALUE`.
    pub metadata: String,
    /// `1h`, `24h`, `7d`, `30d` or empty.
    pub since: String,
    /// `page_token`: the opaque token of the next page, or empty for the first.
    pub page_token: String,
}

impl Filters {
    /// The query string of these filters with another page token.
    pub fn link(&self, page_token: &str) -> String {
        format!(
            "/invocations?instance={}&user={}&state={}&command={}&pattern={}&metadata={}&since={}&page_token={}",
            q(&self.instance),
            q(&self.user),
            q(&self.state),
            q(&self.command),
            q(&self.pattern),
            q(&self.metadata),
            q(&self.since),
            q(page_token)
        )
    }
}

/// The state names the filter offers.
pub const STATES: [(&str, &str); 6] = [
    ("", "Any state"),
    ("running", "Running"),
    ("succeeded", "Succeeded"),
    ("failed", "Failed"),
    ("interrupted", "Interrupted"),
    ("abandoned", "Abandoned"),
];

/// The state a filter name means.
pub fn state_of(name: &str) -> gg::InvocationState {
    use gg::InvocationState::*;
    match name {
        "running" => Running,
        "succeeded" => Succeeded,
        "failed" => Failed,
        "interrupted" => Interrupted,
        "abandoned" => Abandoned,
        _ => Unspecified,
    }
}

/// Metadata keys shown in their own column when present.
const BRANCH_KEYS: [&str; 4] = ["BRANCH", "branch", "GIT_BRANCH", "ref"];
const COMMIT_KEYS: [&str; 4] = ["COMMIT", "commit", "COMMIT_SHA", "sha"];

fn first_of<'a>(inv: &'a gg::Invocation, keys: &[&str]) -> &'a str {
    keys.iter()
        .find_map(|k| inv.build_metadata.get(*k))
        .map_or("", String::as_str)
}

/// The page's content.
pub fn render(f: &Filters, rows: &[gg::Invocation], next_page_token: &str) -> Markup {
    html! {
        h1 { "Invocations" }
        form.filter method="get" action="/invocations" {
            input type="text" name="instance" placeholder="instance" value=(f.instance);
            input type="text" name="user" placeholder="user" value=(f.user);
            select name="state" {
                @for (value, name) in STATES {
                    option value=(value) selected[f.state == value] { (name) }
                }
            }
            input type="text" name="command" placeholder="command (build, test…)" value=(f.command);
            input type="text" name="pattern" placeholder="target pattern contains" value=(f.pattern);
            input type="text" name="metadata" placeholder="KEY=VALUE (e.g. BRANCH=main)" value=(f.metadata);
            select name="since" {
                @for (value, name) in [("", "Any time"), ("1h", "Last hour"), ("24h", "Last day"), ("7d", "Last week"), ("30d", "Last 30 days")] {
                    option value=(value) selected[f.since == value] { (name) }
                }
            }
            button type="submit" { "Search" }
        }
        @if rows.is_empty() {
            p.muted #empty { "No invocations you may see match." }
        } @else {
            table.grid #invocations {
                thead { tr { th { "State" } th { "Invocation" } th { "Instance" } th { "User" } th { "Branch" } th { "Commit" } th { "Started" } th { "Duration" } th { "Tests" } } }
                tbody {
                    @for inv in rows {
                        @let (name, class) = state(inv.state());
                        @let c = inv.counts.unwrap_or_default();
                        tr {
                            td { span class={"badge " (class)} { (name) } }
                            td {
                                a href={"/invocation/" (q(&inv.invocation_id))} {
                                    "bazel " (inv.command) " " (inv.patterns.join(" "))
                                }
                                br; span.muted.mono { (inv.invocation_id) }
                            }
                            td { (inv.instance_name) }
                            td { (inv.user) }
                            td { (first_of(inv, &BRANCH_KEYS)) }
                            td.mono { (first_of(inv, &COMMIT_KEYS).chars().take(12).collect::<String>()) }
                            td { (when(inv.start_time_millis)) }
                            td { (duration(inv.duration_millis)) }
                            td {
                                (c.tests_passed) "/" (c.tests)
                                @if c.tests_failed > 0 { " " span.failed-text { (c.tests_failed) " failed" } }
                                @if c.tests_flaky > 0 { " " span.warn-text { (c.tests_flaky) " flaky" } }
                            }
                        }
                    }
                }
            }
        }
        @if !next_page_token.is_empty() {
            nav.pager { a href=(f.link(next_page_token)) { "Older →" } }
        }
    }
}
