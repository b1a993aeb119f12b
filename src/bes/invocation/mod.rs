//! Invocations: what happened in a build, decoded from the Build Event
//! Protocol at ingest and stored beside the events it came from.
//!
//! - [`decode`]: each stored event's [`decode::Fact`] (once, at ingest);
//! - [`model`]: what a batch of facts changes in its invocation (summary,
//!   targets and tests, console output), applied by every store in the
//!   transaction that stores the events;
//! - [`service`]: `gridgate.v1.Invocations` (list, get, console output);
//! - [`cli`]: `gridgate invocations list|show|log`.

pub mod cli;
pub mod decode;
pub mod model;
pub mod service;

pub use decode::{decode, Fact};
pub use model::{InvocationKey, Publisher, Update};

#[cfg(test)]
pub(crate) mod tests;
