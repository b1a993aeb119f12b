//! Fuzz target `resource_name`: the check is `gridgate::fuzzing::resource_name`, which
//! `tests/fuzz_corpus.rs` also replays on the kept corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| gridgate::fuzzing::resource_name(data));
