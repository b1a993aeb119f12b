//! The static files of the pages, embedded in the binary: one stylesheet,
//! one script. Their paths carry gridgate's version, so browsers may
//! cache them for a day and fetch a new release's at once.

/// The stylesheet.
pub const STYLE: &str = include_str!("assets/style.css");
/// The live-update script.
pub const SCRIPT: &str = include_str!("assets/live.js");

/// Where the stylesheet is served.
pub const STYLE_PATH: &str = concat!("/static/style-", env!("CARGO_PKG_VERSION"), ".css");
/// Where the script is served.
pub const SCRIPT_PATH: &str = concat!("/static/live-", env!("CARGO_PKG_VERSION"), ".js");

/// The asset at `path`: its content type and text.
pub fn get(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        STYLE_PATH => Some(("text/css; charset=utf-8", STYLE)),
        SCRIPT_PATH => Some(("text/javascript; charset=utf-8", SCRIPT)),
        _ => None,
    }
}
