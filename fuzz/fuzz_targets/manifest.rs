//! The manifest loader: YAML text → documents → objects → index → published snapshot.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| gamma_fuzz::manifest(data));
