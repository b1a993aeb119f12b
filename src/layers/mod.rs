//! The layers of the request stack other than the Gate, one concern each;
//! `server` puts them together (see [`crate::server`]).
//!
//! Each file holds a tower `Layer`, its `Service`, its response future and
//! body where it has one, and their unit tests.

pub mod deadline;
pub mod observe;
pub mod request_id;
pub mod shed;
