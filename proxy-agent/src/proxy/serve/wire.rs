//! HTTP/1.1 on the wire for the agent's own server (`http1.rs`): the request heads it serves
//! itself, and answer heads and body framing written as hyper's server writes them (RFC 9112
//! §6–7), so that a client sees the same answers whichever of the two served it. Pure: bytes in,
//! bytes out, so that every case tests without sockets.

use crate::proxy::upstream::wire::{
    chunked_last, decimal, fields_within, header_map, joined, tokens,
};
pub(super) use crate::proxy::upstream::wire::{has_token, has_token_in};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use std::io::Write as _;

/// Fields a request head may have for the agent to read it itself. A head with more goes to
/// hyper's server, which allows `--max-headers`.
const FIELDS: usize = 32;

/// Fields a request's header map has room for beyond its own when it is made.
const FILTERS_ADD: usize = 4;

/// What the start of a connection's unread bytes holds.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // Moved once per request; boxed, it would be an allocation.
pub enum Head {
    /// A whole request the agent serves itself: its head, and its body if it has a small one.
    Own(OwnRequest),
    /// Not a whole head yet.
    Partial,
    /// A whole head of a request the agent serves itself, whose body has not all come yet.
    AwaitingBody,
    /// A request the agent leaves to hyper's server, with the rest of the connection: one with
    /// a chunked body or a body over [`OWN_BODY`], an upgrade, `Expect`, a version other than
    /// HTTP/1.1, or a head that is malformed, or whole and long or with many fields (hyper's
    /// refusals then answer it, as before).
    Hyper,
}

/// The largest request body the agent reads itself, whole with its head (the usual JSON of a
/// call), unless `--max-buffered-body-bytes` is lower; a larger one streams through hyper's
/// server.
pub const OWN_BODY: u64 = 16 * 1024;

#[derive(Debug)]
pub struct OwnRequest {
    /// The request, and its body (empty if none).
    pub request: Request<Bytes>,
    /// The client asked for the connection to close after this answer.
    pub close: bool,
    /// The client takes trailer fields (`TE: trailers`).
    pub trailers: bool,
}

/// What a connection knows of the request it is reading, kept from one read to the next: a head
/// not whole at its first parse is parsed again only once it has an end (each later read's bytes
/// searched alone for one, not the head again), and a body waited for only counted, so that a
/// head or body trickled in costs time in proportion to its length, not to its length times its
/// reads (hyper's server parses no head before it may have ended, and no head again for its
/// body).
#[derive(Debug, Default)]
pub struct HeadSearch {
    /// Bytes from the buffer's start searched and found to hold no head's end.
    searched: usize,
    /// The buffer holds a head's end.
    ended: bool,
    /// The head is longer than the agent's server reads, or has more fields: it goes to
    /// hyper's server once whole.
    long: bool,
    /// The head was read and its body is awaited: the request is whole at this length.
    whole_at: Option<usize>,
}

impl HeadSearch {
    /// Whether the head in `buf` has ended, the bytes searched before known not to end it.
    fn ends(&mut self, buf: &[u8]) -> bool {
        if !self.ended {
            // Empty lines a request may have before it (RFC 9112 §2.2) are no end.
            let leading = buf
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            // An end is 3 bytes at most: it may have begun in the last 2 searched.
            let from = self.searched.saturating_sub(2).max(leading).min(buf.len());
            self.ended = crate::proxy::upstream::wire::head_ends(&buf[from..]);
            self.searched = buf.len();
        }
        self.ended
    }
}

/// Reads a request head from the start of `buf`; when it is one the agent serves itself, removes
/// it from `buf` (its fields share its bytes). `max_head`: the largest head in bytes,
/// `max_headers`: the most fields (the configured limits; a whole head over them goes to hyper's
/// server, whose refusal answers it), `max_body`: the largest body read whole (a larger one
/// streams through hyper's server). `search`: what the connection's earlier reads found of this
/// request.
pub fn request_head(
    buf: &mut BytesMut,
    search: &mut HeadSearch,
    max_head: usize,
    max_headers: usize,
    max_body: u64,
) -> Head {
    if search.long {
        // Known to go to hyper's server: only whether it is whole matters.
        return if search.ends(buf) {
            Head::Hyper
        } else {
            Head::Partial
        };
    }
    if let Some(whole_at) = search.whole_at {
        if buf.len() < whole_at {
            return Head::AwaitingBody;
        }
    } else if search.searched > 0 && !search.ends(buf) {
        // Parsed before, without an end, and none came since: nothing to parse again.
        search.long = buf.len() >= max_head;
        return Head::Partial;
    }
    let mut raw = [httparse::EMPTY_HEADER; FIELDS];
    let mut parsed = httparse::Request::new(&mut raw);
    #[cfg(test)]
    tests::PARSES.set(tests::PARSES.get() + 1);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        // Not whole yet: searched from here on only as more comes (most heads come whole in
        // one read, and are not searched at all). Longer than this server reads, or with more
        // fields: it is read on (timed here, from its first byte) and hyper's server gets it
        // whole, so that its own header timer does not give a slow head a second full spell.
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders)
            if !search.ends(buf) =>
        {
            search.long = buf.len() >= max_head;
            return Head::Partial;
        }
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Head::Partial,
        _ => return Head::Hyper,
    };
    if parsed.version != Some(1) || parsed.headers.len() > max_headers {
        return Head::Hyper;
    }
    let Some(plain) = PlainFields::of(parsed.headers) else {
        return Head::Hyper;
    };
    let body_len = match plain.body_length {
        len if len <= max_body => len as usize,
        _ => return Head::Hyper,
    };
    if buf.len() < head_len + body_len {
        search.whole_at = Some(head_len + body_len);
        return Head::AwaitingBody;
    }
    let method = match parsed.method.map(|m| Method::from_bytes(m.as_bytes())) {
        Some(Ok(method)) if method != Method::CONNECT => method,
        _ => return Head::Hyper,
    };
    let target = parsed.path.map(|path| {
        let from = path.as_ptr() as usize - buf.as_ptr() as usize;
        from..from + path.len()
    });
    let fields_read = parsed.headers.len();
    let (fields, count) = fields_within::<FIELDS>(buf, parsed.headers);
    let head = buf.split_to(head_len).freeze();
    let uri = target.and_then(|target| Uri::from_maybe_shared(head.slice(target)).ok());
    // Room for the fields a route's filters add, too.
    let headers = header_map(&head, &fields[..count], count + FILTERS_ADD);
    let Some(uri) = uri.filter(|_| headers.len() == fields_read) else {
        // Given back whole: hyper's server reads it again and refuses it as it would have.
        let mut whole = BytesMut::with_capacity(head.len() + buf.len());
        whole.extend_from_slice(&head);
        whole.extend_from_slice(buf);
        *buf = whole;
        return Head::Hyper;
    };
    let mut headers = headers;
    // Each looked up only if present: most requests have none of these fields.
    if plain.lengths > 1 {
        crate::proxy::upstream::wire::one_content_length(&mut headers);
    }
    let close = plain.connection && has_token(&headers, &header::CONNECTION, "close");
    let trailers = plain.te && has_token(&headers, &header::TE, "trailers");
    // The next request is searched from its own start.
    *search = HeadSearch::default();
    let mut request = Request::new(buf.split_to(body_len).freeze());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Head::Own(OwnRequest {
        request,
        close,
        trailers,
    })
}

/// What a request head's fields say of its framing and connection, read in one pass over them.
struct PlainFields {
    /// The body's length: the one Content-Length (however repeated) or none (0).
    body_length: u64,
    /// How many Content-Length fields there are (a list in one, `5, 5`, goes to hyper's server).
    lengths: usize,
    connection: bool,
    te: bool,
}

impl PlainFields {
    /// `None` unless the fields frame the body plainly and ask for nothing that hyper's server
    /// does for the agent: no Transfer-Encoding, no Upgrade, no Expect, and one Content-Length
    /// (however repeated) or none.
    fn of(fields: &[httparse::Header<'_>]) -> Option<Self> {
        let mut plain = PlainFields {
            body_length: 0,
            lengths: 0,
            connection: false,
            te: false,
        };
        for field in fields {
            let is = |name: &str| field.name.eq_ignore_ascii_case(name);
            if is("content-length") {
                let value = decimal(field.value)?;
                if plain.lengths > 0 && plain.body_length != value {
                    return None;
                }
                plain.body_length = value;
                plain.lengths += 1;
            } else if is("connection") {
                plain.connection = true;
            } else if is("te") {
                plain.te = true;
            } else if is("transfer-encoding") || is("upgrade") || is("expect") {
                return None;
            }
        }
        Some(plain)
    }
}

/// What an answer's body is known to be before it is read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BodySize {
    /// Already ended.
    Empty,
    Exact(u64),
    Unknown,
}

/// How the answer's body goes on the wire.
#[derive(Debug, PartialEq)]
pub enum Framing {
    /// Exactly this many bytes (0: none at all, as for HEAD, 204 and 304).
    Length(u64),
    /// Chunked; trailer fields are sent only those named here (the answer's `Trailer` field),
    /// and only to a client that takes them.
    Chunked { trailers: Option<Vec<HeaderName>> },
}

/// Writes the head of `status`/`headers` into `out` as hyper's server does, for a request that
/// was a HEAD (`to_head`) or not, whose body is `body`: the status line (a custom reason from
/// `reason`), the fields with lower-case names in the map's order (a field's values joined on one
/// line for Connection, Transfer-Encoding and Trailer), the framing field hyper adds
/// (`content-length`, `transfer-encoding: chunked`), and `date` if absent. Returns the body's
/// framing and whether the answer's Connection field says `close`.
pub fn answer_head(
    status: StatusCode,
    reason: Option<&[u8]>,
    headers: &HeaderMap,
    to_head: bool,
    body: BodySize,
    date: impl FnOnce(&mut Vec<u8>),
    out: &mut Vec<u8>,
) -> (Framing, bool) {
    // hyper's server cannot send a 1xx as a final answer; it sends a 500 instead.
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        out.extend_from_slice(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n");
        finish_head(false, date, out);
        return (Framing::Length(0), true);
    }
    match reason {
        None if status == StatusCode::OK => out.extend_from_slice(b"HTTP/1.1 200 OK\r\n"),
        _ => {
            out.extend_from_slice(b"HTTP/1.1 ");
            out.extend_from_slice(status.as_str().as_bytes());
            out.push(b' ');
            let canonical = status.canonical_reason().unwrap_or("<none>").as_bytes();
            out.extend_from_slice(reason.unwrap_or(canonical));
            out.extend_from_slice(b"\r\n");
        }
    }
    let can_chunk = !to_head && can_have_body(status);
    // Both framing fields (a route's filter may set either): the coding wins and the length is
    // not sent (RFC 9112 §6.2), where hyper's server refused the answer.
    // Looked for among the names rather than by a hashed lookup: an answer has few fields.
    let chunking = can_chunk && headers.keys().any(|name| name == header::TRANSFER_ENCODING);
    let mut framing = None;
    let mut wrote_date = false;
    let mut said_close = false;
    let mut trailer_names: Option<Vec<HeaderName>> = None;
    // A name's values come one after another; those of the framing and connection fields are
    // all handled at its first (looked up then), the others written as they come.
    let mut previous: Option<&HeaderName> = None;
    for (name, first) in headers {
        let repeat = previous == Some(name);
        previous = Some(name);
        let special = matches!(
            *name,
            header::CONTENT_LENGTH
                | header::TRANSFER_ENCODING
                | header::CONNECTION
                | header::TRAILER
        );
        if !special {
            wrote_date |= *name == header::DATE;
            field(out, name, first.as_bytes());
            continue;
        }
        if repeat {
            continue;
        }
        // Looked up only for the fields whose values are all read at once.
        let values = || headers.get_all(name);
        match *name {
            header::CONTENT_LENGTH => {
                if chunking {
                    continue;
                }
                match body {
                    // An ended body: the field is dropped (hyper writes its own `0`), but for a
                    // HEAD, whose field tells the length a GET would have had.
                    BodySize::Empty if !to_head => continue,
                    BodySize::Empty => {
                        framing = Some(Framing::Length(0));
                        field(out, name, first.as_bytes());
                    }
                    // The body's own length, whatever a filter set.
                    BodySize::Exact(length) => {
                        framing = Some(Framing::Length(length));
                        content_length_field(length, out);
                    }
                    BodySize::Unknown => {
                        let Some(length) = decimal(first.as_bytes()) else {
                            // Not a length: the answer cannot be framed by it; chunked instead.
                            continue;
                        };
                        framing = Some(Framing::Length(length));
                        field(out, name, first.as_bytes());
                    }
                }
            }
            header::TRANSFER_ENCODING => {
                if !can_chunk {
                    continue;
                }
                out.extend_from_slice(b"transfer-encoding: ");
                joined(out, values().iter().map(HeaderValue::as_bytes), b", ");
                out.extend_from_slice(if chunked_last(headers) == Some(true) {
                    b"\r\n"
                } else {
                    b", chunked\r\n"
                });
                framing = Some(Framing::Chunked { trailers: None });
            }
            header::CONNECTION => {
                let values = values();
                said_close |= has_token_in(values.iter(), "close");
                joined_field(out, name, &values);
            }
            header::TRAILER => {
                if !can_chunk {
                    continue;
                }
                let names = tokens(headers, name).filter_map(|t| HeaderName::try_from(t).ok());
                trailer_names.get_or_insert_with(Vec::new).extend(names);
                joined_field(out, name, &values());
            }
            _ => unreachable!("not a special field"),
        }
    }
    let framing = match framing {
        Some(framing) => framing,
        None => match body {
            BodySize::Unknown if can_chunk => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked { trailers: None }
            }
            BodySize::Unknown => Framing::Length(0),
            BodySize::Empty | BodySize::Exact(0) => {
                if !to_head && can_have_body(status) {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
                Framing::Length(0)
            }
            BodySize::Exact(length) => {
                if can_have_body(status) {
                    content_length_field(length, out);
                    Framing::Length(length)
                } else {
                    Framing::Length(0)
                }
            }
        },
    };
    let framing = match framing {
        _ if to_head || !can_have_body(status) => Framing::Length(0),
        Framing::Chunked { .. } => Framing::Chunked {
            trailers: trailer_names,
        },
        length => length,
    };
    finish_head(wrote_date, date, out);
    (framing, said_close)
}

/// `content-length: <length>` (without `fmt`'s machinery: most answers write one).
fn content_length_field(length: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The field hyper's server adds last, then the head's end.
fn finish_head(wrote_date: bool, date: impl FnOnce(&mut Vec<u8>), out: &mut Vec<u8>) {
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Neither 204, 304 nor 1xx (RFC 9112 §6.3).
fn can_have_body(status: StatusCode) -> bool {
    !status.is_informational()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED
}

fn field(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A field with its values on one line, `, ` between them (as hyper's server writes
/// Connection and Trailer).
fn joined_field(out: &mut Vec<u8>, name: &HeaderName, values: &header::GetAll<'_, HeaderValue>) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    joined(out, values.iter().map(HeaderValue::as_bytes), b", ");
    out.extend_from_slice(b"\r\n");
}

/// The line before a chunk of `len` bytes.
pub fn chunk_size_line(len: usize, out: &mut Vec<u8>) {
    let _ = write!(out, "{len:X}\r\n");
}

/// The end of a chunked body: the last chunk, then the trailer fields that `allowed` names (as
/// hyper's server sends them: only those the answer's Trailer field announced, and none of the
/// fields a trailer must not carry), to a client that takes them.
pub fn last_chunk(trailers: Option<&HeaderMap>, allowed: Option<&[HeaderName]>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n");
    if let (Some(trailers), Some(allowed)) = (trailers, allowed) {
        for (name, value) in trailers {
            if allowed.contains(name) && trailer_allowed(name) {
                field(out, name, value.as_bytes());
            }
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Fields a trailer section must not carry (RFC 9110 §6.5.1), as hyper's server leaves out.
fn trailer_allowed(name: &HeaderName) -> bool {
    !matches!(
        *name,
        header::AUTHORIZATION
            | header::CACHE_CONTROL
            | header::CONTENT_ENCODING
            | header::CONTENT_LENGTH
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::HOST
            | header::MAX_FORWARDS
            | header::SET_COOKIE
            | header::TRAILER
            | header::TRANSFER_ENCODING
            | header::TE
    )
}

/// Writes the `date` field's value for now, formatted once a second per thread (as hyper's server
/// does). Asked only for an answer without a `date` of its own: most backends send one, and the
/// clock is not read for theirs.
pub fn write_date_now(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second || cached.1.is_empty() {
            *cached = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(cached.1.as_bytes());
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8]) -> (Head, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        (
            request_head(&mut buf, &mut HeadSearch::default(), 8192, 100, OWN_BODY),
            buf,
        )
    }

    fn own(bytes: &[u8]) -> (OwnRequest, BytesMut) {
        match head(bytes) {
            (Head::Own(own), rest) => (own, rest),
            (other, _) => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn a_request_without_a_body_is_read_and_split_off() {
        let (request, rest) = own(
            b"GET /a?b=1 HTTP/1.1\r\nHost: svc\r\nX-Two: 1\r\nx-two: 2\r\nConnection: keep-alive, Close\r\nTE: trailers\r\n\r\nGET /next",
        );
        assert_eq!(&rest[..], b"GET /next", "the next request's bytes stay");
        let (close, trailers) = (request.close, request.trailers);
        let request = request.request;
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri(), "/a?b=1");
        assert_eq!(request.version(), Version::HTTP_11);
        assert_eq!(request.headers()["host"], "svc");
        let two: Vec<_> = request.headers().get_all("x-two").iter().collect();
        assert_eq!(two, ["1", "2"]);
        assert!(close && trailers);
        let (plain, _) = own(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n");
        assert!(!plain.close && !plain.trailers);
        // An absolute-form target and a Content-Length of 0 are the agent's too.
        let (absolute, _) = own(b"DELETE http://svc/x HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(absolute.request.uri(), "http://svc/x");
    }

    #[test]
    fn a_small_body_with_a_length_is_read_whole_with_its_head() {
        let (request, rest) =
            own(b"POST /a HTTP/1.1\r\ncontent-length: 5\r\nContent-Length: 5\r\n\r\nhelloGET /b");
        assert_eq!(request.request.body(), "hello");
        let lengths = request.request.headers().get_all(header::CONTENT_LENGTH);
        assert_eq!(
            lengths.iter().count(),
            1,
            "one Content-Length, as hyper's server keeps"
        );
        assert_eq!(&rest[..], b"GET /b", "the next request's bytes stay");
        let (waiting, rest) = head(b"PUT /a HTTP/1.1\r\ncontent-length: 5\r\n\r\nhel");
        assert!(matches!(waiting, Head::AwaitingBody), "{waiting:?}");
        assert_eq!(rest.len(), 41, "nothing taken before the body is whole");
    }

    #[test]
    fn an_incomplete_head_waits_for_more_and_a_long_one_goes_to_hyper_whole() {
        let (partial, rest) = head(b"GET / HTTP/1.1\r\nhost: x\r\n");
        assert!(matches!(partial, Head::Partial));
        assert_eq!(rest.len(), 25);
        let mut long = b"GET / HTTP/1.1\r\nx-long: ".to_vec();
        long.resize(8192, b'a');
        let (over, rest) = head(&long);
        assert!(
            matches!(over, Head::Partial),
            "read on until whole: {over:?}"
        );
        assert_eq!(rest.len(), 8192, "nothing taken");
        for end in [&b"\r\n\r\n"[..], b"\n\n", b"\r\n\n"] {
            let mut whole = long.clone();
            whole.extend_from_slice(end);
            let (over, rest) = head(&whole);
            assert!(matches!(over, Head::Hyper), "{over:?}");
            assert_eq!(rest.len(), whole.len(), "nothing taken");
        }
        let many: String = (0..40).map(|i| format!("x-{i}: v\r\n")).collect();
        let (partial, _) = head(format!("GET / HTTP/1.1\r\n{many}").as_bytes());
        assert!(matches!(partial, Head::Partial), "{partial:?}");
    }

    /// A long head read a byte at a time goes to hyper's server as soon as its end is read, and
    /// not before, whichever read its end is split across.
    #[test]
    fn a_long_head_read_in_pieces_is_whole_at_its_last_byte() {
        let mut long = b"GET / HTTP/1.1\r\nx-long: ".to_vec();
        long.resize(9000, b'a');
        let many: String = (0..40).map(|i| format!("x-{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{}", many.trim_end());
        // Empty lines before a request line are no end of its head.
        let after_empty_lines = [&b"\r\n\n"[..], &long].concat();
        // None has its last line's end yet.
        for (start, from) in [
            (long, 8100),
            (many.into_bytes(), 20),
            (after_empty_lines, 8100),
        ] {
            for end in [&b"\r\n\r\n"[..], b"\n\n", b"\r\n\n"] {
                let mut whole = start.clone();
                whole.extend_from_slice(end);
                let mut search = HeadSearch::default();
                let mut buf = BytesMut::from(&whole[..from]);
                for byte in &whole[from..] {
                    let read = request_head(&mut buf, &mut search, 8192, 100, OWN_BODY);
                    assert!(matches!(read, Head::Partial), "at {}: {read:?}", buf.len());
                    buf.extend_from_slice(&[*byte]);
                }
                let read = request_head(&mut buf, &mut search, 8192, 100, OWN_BODY);
                assert!(matches!(read, Head::Hyper), "{end:?}: {read:?}");
                assert_eq!(&buf[..], &whole[..], "nothing taken");
            }
        }
    }

    thread_local! {
        /// Heads parsed by `request_head` on this thread.
        pub(super) static PARSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A request read a byte at a time, after empty lines, is parsed at its first read, once its
    /// head has ended and once its body is whole, however many reads brought them (a head was
    /// parsed at each read, and again at each read of its body); the next request is searched
    /// from its own start.
    #[test]
    fn a_request_read_a_byte_at_a_time_is_parsed_once_its_head_ends_and_once_whole() {
        let two = b"\r\nPOST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhelloGET /y HTTP/1.1\r\n\r\n";
        let (mut buf, mut search) = (BytesMut::new(), HeadSearch::default());
        let mut served = Vec::new();
        PARSES.set(0);
        for byte in two {
            buf.extend_from_slice(&[*byte]);
            match request_head(&mut buf, &mut search, 8192, 100, OWN_BODY) {
                Head::Own(own) => served.push((PARSES.get(), own.request)),
                Head::Partial | Head::AwaitingBody => {}
                Head::Hyper => panic!("at {} bytes: handed to hyper", buf.len()),
            }
        }
        let [(parsed_first, post), (parsed_both, get)] = &served[..] else {
            panic!("{served:?}")
        };
        assert_eq!((post.uri().path(), &post.body()[..]), ("/x", &b"hello"[..]));
        assert_eq!(get.uri().path(), "/y");
        assert_eq!((*parsed_first, *parsed_both), (3, 5));
        assert!(buf.is_empty());
    }

    #[test]
    fn requests_hyper_serves_are_left_whole() {
        let many: String = (0..40).map(|i| format!("x-{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let over = format!(
            "POST / HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
            OWN_BODY + 1
        );
        let cases: [&[u8]; 13] = [
            over.as_bytes(),
            b"POST / HTTP/1.1\r\ncontent-length: 0\r\ncontent-length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 5, 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\ncontent-length: +5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            b"PUT / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 0\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"CONNECT svc:80 HTTP/1.1\r\nhost: svc:80\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
            b"GET http:// HTTP/1.1\r\nhost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: x\r\n x-folded: 1\r\n\r\n",
            many.as_bytes(),
        ];
        for case in cases {
            let (parsed, rest) = head(case);
            assert!(
                matches!(parsed, Head::Hyper),
                "{:?}: {parsed:?}",
                String::from_utf8_lossy(case)
            );
            assert_eq!(&rest[..], case, "given back whole");
        }
        // More fields than the configured limit: hyper's server refuses them.
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n"[..]);
        assert!(matches!(
            request_head(&mut buf, &mut HeadSearch::default(), 8192, 2, OWN_BODY),
            Head::Hyper
        ));
    }

    fn written(headers: &[(&str, &str)], body: BodySize) -> (String, Framing) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let mut out = Vec::new();
        let now = |out: &mut Vec<u8>| out.extend_from_slice(b"now");
        let (framing, _) = answer_head(StatusCode::OK, None, &map, false, body, now, &mut out);
        (String::from_utf8(out).unwrap(), framing)
    }

    /// A route's response filters may set framing fields; the answer stays framed one way.
    #[test]
    fn framing_fields_a_filter_set_do_not_make_an_ambiguous_answer() {
        let (head, framing) = written(
            &[("content-length", "5"), ("transfer-encoding", "chunked")],
            BodySize::Exact(5),
        );
        assert!(!head.contains("content-length"), "{head}");
        assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
        assert_eq!(framing, Framing::Chunked { trailers: None });
        let (head, framing) = written(&[("content-length", "10")], BodySize::Exact(5));
        assert!(
            head.contains("content-length: 5\r\n") && !head.contains("10"),
            "{head}"
        );
        assert_eq!(framing, Framing::Length(5));
    }

    #[test]
    fn chunk_lines_and_the_last_chunk() {
        let mut out = Vec::new();
        chunk_size_line(255, &mut out);
        assert_eq!(out, b"FF\r\n");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("1"));
        trailers.insert("x-other", HeaderValue::from_static("2"));
        trailers.insert("content-length", HeaderValue::from_static("3"));
        let allowed = [
            HeaderName::from_static("x-sum"),
            HeaderName::from_static("content-length"),
        ];
        out.clear();
        last_chunk(Some(&trailers), Some(&allowed), &mut out);
        assert_eq!(
            out, b"0\r\nx-sum: 1\r\n\r\n",
            "announced and allowed in a trailer"
        );
        out.clear();
        last_chunk(Some(&trailers), None, &mut out);
        assert_eq!(
            out, b"0\r\n\r\n",
            "none for a client that does not take them"
        );
    }
}
