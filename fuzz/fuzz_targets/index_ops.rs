//! The index, incrementally, against one built from scratch: random applies and deletes from a
//! pool of objects that share names and references (`gamma-engine/tests/support/incremental.rs`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| gamma_fuzz::index_ops(data));
