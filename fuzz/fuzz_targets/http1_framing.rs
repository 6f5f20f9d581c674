//! HTTP/1.1 framing, differential: the same bytes from a client served by the agent's own
//! HTTP/1.1 server and by hyper's alone must reach the backend as the same requests and answer
//! the client with the same bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| gamma_fuzz::http1_framing(data));
