//! The route matcher: a request head against a compiled table (the fixed world, or a small
//! route set carried by the input), then the matched rule's filters.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| gamma_fuzz::route_match(data));
