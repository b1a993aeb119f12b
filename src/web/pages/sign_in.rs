//! The sign-in page (shown, with 401, to an anonymous viewer of something
//! not open to anonymous viewers), refusals and errors.

use maud::{html, Markup};

use super::q;

/// The sign-in page's content: sign-in with the OpenID provider when one is
/// configured, and what else identifies a viewer.
pub fn render(next: &str, issuer: Option<&str>, note: Option<&str>) -> Markup {
    html! {
        section.box {
            h1 { "Sign in" }
            @if let Some(n) = note { p.warn-text { (n) } }
            @if let Some(issuer) = issuer {
                p { a.button href={"/auth/sign-in?next=" (q(next))} #sign-in { "Sign in with " (issuer) } }
            }
            p.muted {
                "You may also present a client certificate your browser holds, or call the API with "
                code { "Authorization: Bearer <token>" } "."
            }
        }
    }
}

/// A refusal or error: its title and reason.
pub fn message(title: &str, reason: &str) -> Markup {
    html! {
        section.box {
            h1 { (title) }
            p #reason { (reason) }
            p { a href="/invocations" { "Invocations you may see" } }
        }
    }
}
