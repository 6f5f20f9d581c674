//! `gamma-codec-floor LISTEN BACKEND_A BACKEND_B`: the least an HTTP/1.1 forwarder on tokio does
//! below hyper, for the peers benchmark: what an HTTP/1.1 codec of our own could buy at most
//! (issue 17 asks whether to go below hyper, with numbers).
//!
//! The hyper floor's layout (a current-thread runtime per core, copies of one listening socket,
//! pooled upstream connections per worker) and the benchmark's work (set `x-perf-added: proxy`,
//! split 90/10, drop `Connection`), with heads parsed by `httparse` into buffers reused for the
//! life of a connection: no per-request allocation, no task or channel per request, one write
//! per head and body. Only what the benchmark sends is handled: requests without a body or with
//! a `Content-Length`, answers with a `Content-Length`. Anything else is answered 501 (request)
//! or 502 (answer) and the connection is closed. It is a measuring stick, not a proxy.

use anyhow::Result;
use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_HEADERS: usize = 64;

fn main() -> Result<()> {
    gamma_tests::floor::run_per_core("gamma-codec-floor", false, accept_loop)
}

/// A worker's idle upstream connections, per backend.
struct Worker {
    backends: [SocketAddr; 2],
    idle: [RefCell<Vec<TcpStream>>; 2],
    /// Nine requests to the first backend, then one to the second.
    turn: Cell<u32>,
}

async fn accept_loop(listeners: gamma_tests::floor::Listeners, backends: [SocketAddr; 2]) {
    let listener = listeners.http1;
    let worker = Rc::new(Worker {
        backends,
        idle: Default::default(),
        turn: Cell::new(0),
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::task::spawn_local(serve(stream, worker.clone()));
    }
}

/// What a request head says about forwarding it.
struct Request {
    head_len: usize,
    body_len: usize,
    close: bool,
}

/// Parses a request head in `buf` and writes the upstream head to `out`; `Ok(None)`: incomplete.
fn request_head(buf: &[u8], out: &mut Vec<u8>) -> Result<Option<Request>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let Some(head_len) = head_length(request.parse(buf), "malformed request head")? else {
        return Ok(None);
    };
    let (Some(method), Some(path)) = (request.method, request.path) else {
        return Err("malformed request head");
    };
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut body_len = 0;
    let mut close = request.version == Some(0);
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("connection") {
            close = header.value.eq_ignore_ascii_case(b"close");
            continue;
        }
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("request bodies without a Content-Length are not handled");
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            body_len = content_length(header.value).ok_or("malformed Content-Length")?;
        }
        if header.name.eq_ignore_ascii_case("x-perf-added") {
            continue;
        }
        out.extend_from_slice(header.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(header.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-perf-added: proxy\r\n\r\n");
    Ok(Some(Request {
        head_len,
        body_len,
        close,
    }))
}

/// Where an answer ends, where its head ends, and whether the upstream keeps the connection.
#[derive(Debug, PartialEq)]
struct Answer {
    len: usize,
    head_len: usize,
    keep: bool,
}

/// Parses an answer head in `buf` and writes the client's head to `out`: the upstream's own
/// `Connection` dropped (hop-by-hop), `Connection: close` when the client's connection closes
/// after it. `Ok(None)`: incomplete.
fn response_head(
    buf: &[u8],
    out: &mut Vec<u8>,
    close: bool,
) -> Result<Option<Answer>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let Some(head_len) = head_length(response.parse(buf), "malformed answer head")? else {
        return Ok(None);
    };
    let code = response.code.ok_or("malformed answer head")?;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse reads exactly three digits.
    out.extend([code / 100, code / 10 % 10, code % 10].map(|d| b'0' + d as u8));
    out.push(b' ');
    out.extend_from_slice(response.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut body_len = None;
    let mut keep = response.version == Some(1);
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("connection") {
            keep = !header.value.eq_ignore_ascii_case(b"close");
            continue;
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            body_len = content_length(header.value);
        }
        out.extend_from_slice(header.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(header.value);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let body_len = body_len.ok_or("answers without a Content-Length are not handled")?;
    Ok(Some(Answer {
        len: head_len + body_len,
        head_len,
        keep,
    }))
}

/// A head's length once complete (`None`: not yet), or `malformed`.
fn head_length(
    parsed: httparse::Result<usize>,
    malformed: &'static str,
) -> Result<Option<usize>, &'static str> {
    match parsed {
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(malformed),
    }
}

fn content_length(value: &[u8]) -> Option<usize> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Reads into `buf` until `parse` says complete; `Ok(None)`: the peer closed first.
async fn read_until<T>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    mut parse: impl FnMut(&[u8]) -> Result<Option<T>, &'static str>,
) -> io::Result<Option<T>> {
    loop {
        if let Some(parsed) = parse(buf).map_err(io::Error::other)? {
            return Ok(Some(parsed));
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Reads until `buf` holds `len` bytes.
async fn read_to_len(stream: &mut TcpStream, buf: &mut Vec<u8>, len: usize) -> io::Result<()> {
    while buf.len() < len {
        if stream.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

async fn serve(mut client: TcpStream, worker: Rc<Worker>) {
    let mut request_buf = Vec::with_capacity(8192);
    let mut upstream_head = Vec::with_capacity(1024);
    let mut answer_buf = Vec::with_capacity(8192);
    let mut client_answer = Vec::with_capacity(8192);
    loop {
        let parsed = read_until(&mut client, &mut request_buf, |buf| {
            request_head(buf, &mut upstream_head)
        })
        .await;
        let request = match parsed {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(_) => {
                let _ = client
                    .write_all(b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                return;
            }
        };
        let end = request.head_len + request.body_len;
        if read_to_len(&mut client, &mut request_buf, end)
            .await
            .is_err()
        {
            return;
        }
        upstream_head.extend_from_slice(&request_buf[request.head_len..end]);
        request_buf.drain(..end);
        let turn = worker.turn.get();
        worker.turn.set(turn.wrapping_add(1));
        let backend = usize::from(turn % 10 == 9);
        let exchanged = exchange(
            &worker,
            backend,
            &upstream_head,
            &mut answer_buf,
            (&mut client_answer, request.close),
        )
        .await;
        let Ok(answer) = exchanged else {
            let _ = client
                .write_all(
                    b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
            return;
        };
        client_answer.extend_from_slice(&answer_buf[answer.head_len..answer.len]);
        if client.write_all(&client_answer).await.is_err() || request.close {
            return;
        }
    }
}

/// Sends `request` on an idle connection to `backend` (or a new one) and reads the whole answer
/// into `answer`, its head for the client into `client_head` (closing the client's connection
/// after it, or not); the connection goes back to the pool when the upstream keeps it. A pooled
/// connection that ends before a byte of answer was closed by the upstream while idle: the
/// request goes again on another one.
async fn exchange(
    worker: &Worker,
    backend: usize,
    request: &[u8],
    answer: &mut Vec<u8>,
    (client_head, close): (&mut Vec<u8>, bool),
) -> io::Result<Answer> {
    loop {
        let pooled = worker.idle[backend].borrow_mut().pop();
        let reused = pooled.is_some();
        let mut upstream = match pooled {
            Some(upstream) => upstream,
            None => {
                let upstream = TcpStream::connect(worker.backends[backend]).await?;
                upstream.set_nodelay(true)?;
                upstream
            }
        };
        answer.clear();
        let sent = async {
            upstream.write_all(request).await?;
            read_until(&mut upstream, answer, |buf| {
                response_head(buf, client_head, close)
            })
            .await
        }
        .await;
        let parsed = match sent {
            Ok(Some(head)) => head,
            Ok(None) | Err(_) if reused && answer.is_empty() => continue,
            Ok(None) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Err(e) => return Err(e),
        };
        read_to_len(&mut upstream, answer, parsed.len).await?;
        if answer.len() != parsed.len {
            return Err(io::Error::other("the upstream sent more than its answer"));
        }
        if parsed.keep {
            worker.idle[backend].borrow_mut().push(upstream);
        }
        return Ok(parsed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_goes_upstream_without_connection_and_with_the_added_header() {
        let mut out = Vec::new();
        let head =
            b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc";
        let request = request_head(head, &mut out).unwrap().unwrap();
        assert_eq!(request.head_len, head.len() - 3);
        assert_eq!(request.body_len, 3);
        assert!(request.close);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nx-perf-added: proxy\r\n\r\n"
        );
    }

    #[test]
    fn incomplete_and_unhandled_request_heads() {
        let mut out = Vec::new();
        assert!(request_head(b"GET / HTTP/1.1\r\nHost: x\r\n", &mut out)
            .unwrap()
            .is_none());
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(request_head(chunked, &mut out).is_err());
        let keep_alive = request_head(b"GET / HTTP/1.1\r\n\r\n", &mut out)
            .unwrap()
            .unwrap();
        assert!(!keep_alive.close);
        let http10 = request_head(b"GET / HTTP/1.0\r\n\r\n", &mut out)
            .unwrap()
            .unwrap();
        assert!(http10.close);
    }

    #[test]
    fn an_answer_is_its_head_and_content_length() {
        let mut out = Vec::new();
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nConnection: keep-alive\r\n\r\nok";
        let parsed = response_head(answer, &mut out, false).unwrap().unwrap();
        let head_len = answer.len() - 2;
        assert_eq!(
            parsed,
            Answer {
                len: answer.len(),
                head_len,
                keep: true
            }
        );
        assert_eq!(out, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n");
        let closing = b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        let parsed = response_head(closing, &mut out, true).unwrap().unwrap();
        assert!(!parsed.keep);
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(
            response_head(b"HTTP/1.1 200 OK\r\n", &mut out, false).unwrap(),
            None
        );
        assert!(
            response_head(b"HTTP/1.1 200 OK\r\n\r\n", &mut out, false).is_err(),
            "no length"
        );
    }
}
