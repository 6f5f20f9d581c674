//! Protocol detection from a connection's first bytes: HTTP/1.1, HTTP/2 with prior knowledge, or
//! opaque TCP.

use super::io::Lingering;
use std::time::Duration;

#[derive(Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Classifies a connection from its first bytes; `None`: not enough bytes yet.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    if bytes.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if H2_PREFACE.starts_with(bytes) && bytes.len() > 3 {
        return None; // "PRI " so far: wait for the whole preface
    }
    // HTTP/1: after empty lines a server ignores (RFC 9112 §2.2), a method token (upper-case
    // letters, and `-` or `_` after the first, as in VERSION-CONTROL), then a space, and a
    // request line that ends in its version. A token and a space alone are other protocols too:
    // PROXY protocol's `PROXY TCP4 …`, Redis's inline `AUTH …`, IRC's `NICK …`.
    // Empty lines end in CRLF or a bare LF (as httparse skips them), however the segments cut
    // them; more than a few are not HTTP's.
    const MAX_EMPTY_LINES: usize = 4;
    let (mut start, mut empty_lines) = (0, 0);
    while empty_lines < MAX_EMPTY_LINES {
        match &bytes[start..] {
            [b'\r', b'\n', ..] => start += 2,
            [b'\n', ..] => start += 1,
            [b'\r'] => return None,
            _ => break,
        }
        empty_lines += 1;
    }
    let bytes = &bytes[start..];
    let token_len = bytes
        .iter()
        .enumerate()
        .take_while(|(i, b)| b.is_ascii_uppercase() || (*i > 0 && matches!(b, b'-' | b'_')))
        .count();
    match bytes.get(token_len) {
        Some(b' ') if token_len > 0 => request_line(&bytes[token_len + 1..]),
        None if token_len < 16 => None,
        _ => Some(Protocol::Opaque),
    }
}

/// The longest request line waited for: beyond it, the bytes are not taken for HTTP/1.
const MAX_REQUEST_LINE: usize = 8192;

/// Whether the rest of a first line after a method and a space makes it a request line: at
/// once for a path (origin form), else once it ends in ` HTTP/1.0` or ` HTTP/1.1` (asterisk,
/// absolute and authority form; a bare LF ends it too, as servers accept: RFC 9112 §2.2): RTSP
/// and SIP lines look alike up to their versions (`OPTIONS * RTSP/1.0`). `None` while it has
/// not ended.
fn request_line(bytes: &[u8]) -> Option<Protocol> {
    match bytes.first() {
        None => return None,
        Some(b'/') => return Some(Protocol::Http1),
        Some(_) => {}
    }
    let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
        return (bytes.len() >= MAX_REQUEST_LINE).then_some(Protocol::Opaque);
    };
    let line = bytes[..end].strip_suffix(b"\r").unwrap_or(&bytes[..end]);
    let versioned = line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0");
    Some(if versioned {
        Protocol::Http1
    } else {
        Protocol::Opaque
    })
}

/// What the first bytes of a connection said.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Detected {
    Protocol(Protocol),
    /// Nothing (or not enough to tell) within the time given.
    TimedOut,
    /// The connection failed (a reset) before its bytes told.
    Closed,
    /// The peer closed its side after bytes that do not tell, or none: no more will come (a
    /// client of a server-first protocol may half-close at once and read the server's answer).
    Ended,
}

/// Reads the connection's first bytes until they tell its protocol, for at most `timeout`; the
/// connection's reads return them again (see [`Lingering`]).
pub(super) async fn detect(stream: &mut Lingering, timeout: Duration) -> Detected {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let first = match tokio::time::timeout_at(deadline, stream.read_first_bytes()).await {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => return Detected::Ended,
            Ok(Err(_)) => return Detected::Closed,
            Err(_) => return Detected::TimedOut,
        };
        if let Some(p) = classify(first) {
            return Detected::Protocol(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET / HTTP/1.0\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"POST /x"),
            Some(Protocol::Http1),
            "a path: at once"
        );
        assert_eq!(classify(b"POST "), None);
        assert_eq!(
            classify(b"GET http://svc/x HTTP/1.1"),
            None,
            "absolute form: the line not ended yet"
        );
        assert_eq!(
            classify(b"GET http://svc/x HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(
            classify(b"CONNECT svc:443 HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        // A token and a space open other protocols' lines too.
        assert_eq!(
            classify(b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\nGET / HTTP/1.1\r\n"),
            Some(Protocol::Opaque)
        );
        assert_eq!(classify(b"AUTH secret\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"NICK gamma\r\n"), Some(Protocol::Opaque));
        let mut long = b"GET http://".to_vec();
        long.resize("GET ".len() + MAX_REQUEST_LINE, b'a');
        assert_eq!(classify(&long), Some(Protocol::Opaque));
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Protocol::Http2)
        );
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"\x16\x03\x01"),
            Some(Protocol::Opaque),
            "TLS is opaque"
        );
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Protocol::Opaque));
        // Valid HTTP/1 that sniffing must not take for opaque bytes.
        assert_eq!(classify(b"\r\nGET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"VERSION-CONTROL /r HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"\r\n"), None, "an empty line so far");
        assert_eq!(classify(b"\r\n\r\n\r\n\r\n\r\n"), Some(Protocol::Opaque));
        // However the segments cut the empty lines, and with bare LFs (RFC 9112 §2.2).
        assert_eq!(classify(b"\r"), None);
        assert_eq!(classify(b"\r\n\r"), None);
        assert_eq!(classify(b"\n\nGET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"\r\n\r\n\r\nGET / HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        // The asterisk form is HTTP's by its version: RTSP's is not.
        assert_eq!(classify(b"OPTIONS * RTSP/1.0\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"OPTIONS * "), None);
        // However the bytes are cut, a prefix waits or says what the whole says.
        for whole in [
            &b"\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\n"[..],
            b"\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\n",
            b"\n\r\n\nOPTIONS * HTTP/1.1\r\n",
            b"OPTIONS * RTSP/1.0\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET http://svc/x HTTP/1.1\r\n",
        ] {
            let said = classify(whole);
            assert!(said.is_some(), "{:?}", String::from_utf8_lossy(whole));
            for cut in 0..whole.len() {
                let prefix = classify(&whole[..cut]);
                assert!(
                    prefix.is_none() || prefix == said,
                    "{:?} cut at {cut}: {prefix:?}, whole: {said:?}",
                    String::from_utf8_lossy(whole)
                );
            }
        }
        assert_eq!(classify(b"-GET /"), Some(Protocol::Opaque));
    }

    /// What detection says of a client that sends `bytes` and then closes its side.
    async fn detected_after(bytes: &[u8]) -> Detected {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        client.write_all(bytes).await.unwrap();
        client.shutdown().await.unwrap();
        let draining = tokio::sync::watch::channel(false).1;
        let tracker = tokio_util::task::TaskTracker::new();
        let mut served = Lingering::new(accepted, draining, tracker);
        detect(&mut served, Duration::from_secs(10)).await
    }

    #[tokio::test]
    async fn a_client_that_stops_sending_is_not_waited_for() {
        assert_eq!(detected_after(b"").await, Detected::Ended);
        assert_eq!(detected_after(b"GE").await, Detected::Ended);
        assert_eq!(
            detected_after(b"GET / HTTP/1.1\r\n").await,
            Detected::Protocol(Protocol::Http1)
        );
    }
}
