//! The checks behind gridgate's fuzz targets, for fuzzing only.
//!
//! Each function takes the raw bytes of one fuzz input, drives one of the
//! parsers that see untrusted or operator-written text, and panics when an
//! invariant of that parser does not hold. The cargo-fuzz targets in
//! `tests/fuzz/fuzz_targets/` call them under libFuzzer, and
//! `tests/fuzz_corpus.rs` replays the kept corpus (`tests/fuzz/seeds/`)
//! through the very same functions on the stable toolchain, so a fixed crash
//! stays fixed. They are not part of gridgate's API: the panics are the point
//! here, and nothing on a request path calls this module.
//!
//! | function | what it drives |
//! | --- | --- |
//! | [`token`] | JWT parsing and validation ([`crate::gate::jwt`]) |
//! | [`frame`] | the frame peek, decompression, the protobuf scanner and `route::locate` |
//! | [`resource_name`] | ByteStream resource names ([`crate::reapi::resource`]) |
//! | [`policy`] | ACL policy files ([`crate::gate::policy`]) |
//! | [`config`] | config files ([`crate::config::Config::parse`]) and the Gate built from them |

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use aws_lc_rs::hmac;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::FutureExt as _;
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody};
use prost::Message as _;
use serde_json::{Map, Value};
use tonic::body::Body;
use tonic::Status;

use crate::config::{Config, JwtConfig, JwtKeyConfig};
use crate::gate::frame::{self, Encoding, Limits};
use crate::gate::identity::{AuthMethod, Identity, PeerCertificate};
use crate::gate::jwt::{ClaimMapping, JwtAuthenticator, JwtSettings, KeySource, ProviderSettings};
use crate::gate::policy::{self, MatchMode, Policy, PolicyOptions};
use crate::gate::route::{self, Locate, RouteTable};
use crate::gate::scan::{self, Kind, Value as ScanValue};
use crate::gate::Gate;
use crate::proto::build::bazel::remote::execution::v2 as reapi;
use crate::proto::google::devtools::build::v1 as bes;
use crate::reapi::resource::{self, Access, ResourceName};

mod configs;
mod frames;
mod policies;
mod resource_names;
mod tokens;

pub use configs::config;
pub use frames::frame;
pub use policies::policy;
pub use resource_names::resource_name;
pub use tokens::token;
#[allow(unused_imports)]
use {configs::*, frames::*, policies::*, resource_names::*, tokens::*};

#[cfg(test)]
mod tests;
