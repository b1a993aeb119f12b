//! The HTML pages, rendered on the server with `maud` (which escapes every
//! value put into the page: target names, test output, metadata all arrive
//! as text). No inline script or style: the stylesheet and the one script
//! are files of [`super::assets`], allowed by the Content-Security-Policy.

pub mod ansi;
pub mod invocation;
pub mod list;
pub mod sign_in;

use maud::{html, Markup, DOCTYPE};

use super::assets;
use super::viewer::{SignedIn, Viewer};
use crate::proto::gridgate::v1 as gg;

/// The frame of every page: head, top bar with the viewer, the content.
pub fn layout(title: &str, viewer: Option<&Viewer>, live: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="same-origin";
                title { (title) " · gridgate" }
                link rel="stylesheet" href=(assets::STYLE_PATH);
                script src=(assets::SCRIPT_PATH) defer {}
            }
            body data-live=[live] {
                header.top {
                    a.brand href="/" { "gridgate" }
                    nav { a href="/invocations" { "Invocations" } }
                    span.who {
                        @if let Some(v) = viewer {
                            @match &v.how {
                                SignedIn::Anonymous => {
                                    "not signed in · " a href="/auth/sign-in" { "sign in" }
                                }
                                SignedIn::Session { csrf } => {
                                    "signed in as " b { (v.display_name()) }
                                    form.inline method="post" action="/auth/sign-out" {
                                        input type="hidden" name="csrf" value=(csrf);
                                        button type="submit" { "Sign out" }
                                    }
                                }
                                SignedIn::Certificate => {
                                    "certificate " b { (v.display_name()) }
                                }
                                SignedIn::Bearer => {
                                    "token " b { (v.display_name()) }
                                }
                            }
                        }
                    }
                }
                main id="live" { (body) }
            }
        }
    }
}

/// The state's name and badge class.
pub fn state(s: gg::InvocationState) -> (&'static str, &'static str) {
    use gg::InvocationState::*;
    match s {
        Running => ("Running", "running"),
        Succeeded => ("Succeeded", "ok"),
        Failed => ("Failed", "failed"),
        Interrupted => ("Interrupted", "warn"),
        Abandoned => ("Abandoned", "warn"),
        Unspecified => ("Waiting", "neutral"),
    }
}

/// A badge for a test or target status (`PASSED`, `FAILED`, `FLAKY`, ...).
pub fn status_class(status: &str) -> &'static str {
    match status {
        "PASSED" | "BUILT" => "ok",
        "FLAKY" => "warn",
        "" | "NO_STATUS" | "SKIPPED" => "neutral",
        _ => "failed",
    }
}

/// Milliseconds since the epoch as `2026-01-02 15:04:05 UTC`.
pub fn when(millis: i64) -> String {
    if millis <= 0 {
        return "—".into();
    }
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(millis / 1000) else {
        return "—".into();
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A duration as `850 ms`, `12.3 s`, `4m 05s`, `2h 03m`.
pub fn duration(millis: i64) -> String {
    match millis {
        m if m <= 0 => "—".into(),
        m if m < 1000 => format!("{m} ms"),
        m if m < 60_000 => format!("{:.1} s", m as f64 / 1000.0),
        m if m < 3_600_000 => format!("{}m {:02}s", m / 60_000, (m / 1000) % 60),
        m => format!("{}h {:02}m", m / 3_600_000, (m / 60_000) % 60),
    }
}

/// A metadata value: a link when it is an http(s) URL, text otherwise.
pub fn maybe_link(value: &str) -> Markup {
    let is_url = (value.starts_with("https://") || value.starts_with("http://"))
        && !value.chars().any(|c| c.is_whitespace() || c.is_control());
    html! {
        @if is_url {
            a href=(value) rel="noopener noreferrer nofollow" { (value) }
        } @else {
            (value)
        }
    }
}

/// A URL query component (percent-encoding everything but unreserved characters).
pub fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls_become_links() {
        assert!(maybe_link("https://ci.example/job/1").0.contains("<a href"));
        assert!(!maybe_link("javascript:alert(1)").0.contains("<a"));
        assert!(!maybe_link("https://x.example/ onmouseover=")
            .0
            .contains("<a"));
        assert_eq!(maybe_link("\"><b>").0, "&quot;&gt;&lt;b&gt;");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_340), "12.3 s");
        assert_eq!(duration(245_000), "4m 05s");
        assert_eq!(duration(7_380_000), "2h 03m");
        assert_eq!(when(1_700_000_000_000), "2023-11-14 22:13:20 UTC");
    }
}
