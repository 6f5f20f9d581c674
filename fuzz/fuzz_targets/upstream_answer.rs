//! Upstream answers, differential: the same bytes from a backend read by the agent's own
//! HTTP/1.1 exchange and by hyper's client must give the caller the same answer, and never leave
//! bytes behind for the next request on a kept connection.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| gamma_fuzz::upstream_answer(data));
