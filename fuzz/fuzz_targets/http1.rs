//! The HTTP path through the agent: arbitrary bytes from a client on one connection, served by
//! the agent's own hyper server and `Proxy::handle`, forwarding to an in-process backend.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| gamma_fuzz::http_connection(data));
