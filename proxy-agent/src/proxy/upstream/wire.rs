//! HTTP/1.1 on the wire for the exchanges the agent runs itself (`inline.rs`): a request head
//! out, an answer head in (RFC 9112 §4–6), and the answer's body framing, chunked coding
//! included (§7). Pure: bytes in, bytes or frames out, so that every case tests without sockets.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// Header fields an answer head or trailer section may have, as hyper's client allows.
const MAX_HEADERS: usize = 100;

/// The largest answer head (and trailer section) read, as hyper's client's largest read buffer:
/// an upstream that hyper's client accepted is accepted here too.
pub const MAX_HEAD: usize = 8192 + 4096 * 100;

/// The longest chunk-size line, with its extensions (which are ignored).
const MAX_CHUNK_LINE: usize = 8192;

/// Why an upstream's answer cannot be relayed. The upstream's connection is not reused after one.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("the upstream's answer head is malformed ({0})")]
    MalformedHead(httparse::Error),
    #[error("the upstream's answer head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the upstream's answer has an invalid status code {0}")]
    BadStatus(u16),
    #[error("the upstream's answer has conflicting or invalid Content-Length values")]
    BadContentLength,
    #[error("the upstream switched protocols on a request that asked for no upgrade")]
    UnaskedUpgrade,
    #[error(
        "the upstream's HTTP/1.0 answer has a Transfer-Encoding (faulty framing, RFC 9112 §6.1)"
    )]
    TransferEncodingInHttp10,
    #[error(
        "the upstream's answer has a transfer coding other than chunked, which the agent does \
         not decode (RFC 9112 §6.1)"
    )]
    UnsupportedTransferCoding,
    #[error("the upstream's chunked body is malformed: {0}")]
    BadChunk(&'static str),
    #[error("the upstream closed its connection before the answer's end")]
    ClosedEarly,
}

/// The `scheme` and `authority` a request's target names in absolute form.
pub type Origin<'a> = (&'a str, &'a str);

/// Where an HTTP/1 caller sent its target in absolute form (`GET http://a/x`), it goes upstream
/// so too, for the Host the filters left: a forward proxy behind a Service needs it, and every
/// server must take it (RFC 9112 §3.2.2). `None`: origin form (HTTP/2 callers' targets carry
/// their authority whatever the form their client wrote).
pub fn absolute_origin(parts: &http::request::Parts) -> Option<Origin<'_>> {
    if parts.version >= http::Version::HTTP_2 {
        return None;
    }
    let scheme = parts.uri.scheme_str()?;
    let host = parts.headers.get(header::HOST)?.to_str().ok()?;
    Some((scheme, host))
}

/// Writes the head of a request without a body, as an HTTP/1.1 upstream gets it:
/// `METHOD target HTTP/1.1` (origin form), then `headers` (lower-case names, as hyper's client
/// sends them) with the HTTP/1.1 hop's own rules, those `forward::upstream_request` applies for
/// hyper's client:
/// - `host` (when `headers` has no Host: HTTP/2 callers name the authority in the URI);
/// - `TE: trailers` with its connection option, `Connection: te` (RFC 9110 §10.1.4): a server
///   such as hyper's sends its trailers only when asked;
/// - HTTP/2's Cookie crumbs joined into one field with `; ` (RFC 9113 §8.2.3).
///
/// One more than hyper's client does: a POST, PUT or PATCH without a Content-Length gets
/// `content-length: 0` (RFC 9110 §8.6: a user agent SHOULD send it where content has a meaning;
/// some servers refuse such a request without one, 411). Bodiless requests all come this way.
pub fn request_head(
    method: &Method,
    (origin, target): (Option<Origin<'_>>, Option<&http::uri::PathAndQuery>),
    headers: &HeaderMap,
    host: Option<&str>,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    if let Some((scheme, authority)) = origin {
        out.extend_from_slice(scheme.as_bytes());
        out.extend_from_slice(b"://");
        out.extend_from_slice(authority.as_bytes());
    }
    // Origin form: an empty path is `/` (RFC 9112 §3.2.1), also before a query.
    out.extend_from_slice(target.map_or("/", |t| t.path()).as_bytes());
    if let Some(query) = target.and_then(|t| t.query()) {
        out.push(b'?');
        out.extend_from_slice(query.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host {
        field(out, "host", [host.as_bytes()]);
    }
    let mut cookies_written = false;
    for (name, value) in headers {
        if name == header::TE {
            // `strip_hop_by_hop` kept it only as `trailers`.
            field(out, "te", [value.as_bytes()]);
            field(out, "connection", [&b"te"[..]]);
            continue;
        }
        if name == header::CONNECTION {
            // An upgrade's never comes this way; TE's is written with it.
            continue;
        }
        if name == header::COOKIE {
            if !std::mem::replace(&mut cookies_written, true) {
                let crumbs = headers.get_all(header::COOKIE).iter().map(|v| v.as_bytes());
                field(out, "cookie", crumbs);
            }
            continue;
        }
        field(out, name.as_str(), [value.as_bytes()]);
    }
    let may_carry_a_body = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
    if may_carry_a_body && !headers.contains_key(header::CONTENT_LENGTH) {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// `name: value` (several values joined with `; `, as Cookie crumbs are), then CRLF.
fn field<'v>(out: &mut Vec<u8>, name: &str, values: impl IntoIterator<Item = &'v [u8]>) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    joined(out, values, b"; ");
    out.extend_from_slice(b"\r\n");
}

/// A field's values on one line, `separator` between them.
pub(in crate::proxy) fn joined<'v>(
    out: &mut Vec<u8>,
    values: impl IntoIterator<Item = &'v [u8]>,
    separator: &[u8],
) {
    for (i, value) in values.into_iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(separator);
        }
        out.extend_from_slice(value);
    }
}

/// How an answer's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Framing {
    /// No body: an answer to HEAD, a 204 or 304, or `Content-Length: 0`.
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// An answer's head, as read from the upstream.
#[derive(Debug)]
pub struct AnswerHead {
    pub status: StatusCode,
    /// The reason phrase, when it is not the status code's usual one (it is relayed as sent).
    pub reason: Option<Bytes>,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the connection can carry another request after this answer's body.
    pub reusable: bool,
}

/// A header field's name and value, as offsets into the head.
#[derive(Clone, Copy, Default)]
pub(in crate::proxy) struct FieldAt {
    name: (u32, u32),
    value: (u32, u32),
}

/// Reads the final answer head from the start of `buf` and removes it (and any informational
/// 1xx answers before it) from `buf`, leaving the body's first bytes. `Ok(None)`: the head is not
/// complete yet. `to_head`: the request was a HEAD (its answer has no body, whatever it says).
pub fn answer_head(buf: &mut BytesMut, to_head: bool) -> Result<Option<AnswerHead>, WireError> {
    loop {
        // Most answers have a few fields: room for more is made only when they do not fit.
        let split = match split_head::<FEW_HEADERS>(buf) {
            Err(WireError::MalformedHead(httparse::Error::TooManyHeaders)) => {
                split_head::<MAX_HEADERS>(buf)
            }
            other => other,
        };
        let Some(head) = split? else {
            return Ok(None);
        };
        let status = head.status;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(WireError::UnaskedUpgrade);
        }
        if status.is_informational() {
            // 100 Continue, 103 Early Hints: the final answer follows.
            continue;
        }
        return framed(status, head.reason, head.version, head.headers, to_head).map(Some);
    }
}

/// Fields an answer head usually has at most; parsing makes room for this many at first.
const FEW_HEADERS: usize = 16;

/// Where each of `raw`'s fields lies in `buf`, so that a head split off `buf` can share its
/// bytes. httparse points names and values into `buf`; a slice elsewhere (none is expected) is
/// dropped, not trusted.
pub(in crate::proxy) fn fields_within<const N: usize>(
    buf: &[u8],
    raw: &[httparse::Header<'_>],
) -> ([FieldAt; N], usize) {
    let within = buf.as_ptr_range();
    let at = |s: &[u8]| {
        let range = s.as_ptr_range();
        if !(within.start <= range.start && range.end <= within.end) {
            return None;
        }
        let from = range.start as usize - within.start as usize;
        // Offsets of 32 bits: the arrays of them are half the size (heads are far shorter).
        Some((
            u32::try_from(from).ok()?,
            u32::try_from(from + s.len()).ok()?,
        ))
    };
    let mut fields = [FieldAt::default(); N];
    let mut count = 0;
    for field in raw {
        if let (Some(name), Some(value)) = (at(field.name.as_bytes()), at(field.value)) {
            fields[count] = FieldAt { name, value };
            count += 1;
        }
    }
    (fields, count)
}

/// An answer head, split off the bytes read; its fields share those bytes.
struct SplitHead {
    status: StatusCode,
    reason: Option<Bytes>,
    version: Version,
    headers: HeaderMap,
}

/// Parses an answer head of at most `N` fields at the start of `buf` and splits it off.
fn split_head<const N: usize>(buf: &mut BytesMut) -> Result<Option<SplitHead>, WireError> {
    let mut raw = [httparse::EMPTY_HEADER; N];
    let mut parsed = httparse::Response::new(&mut raw);
    // `Name : value`: a proxy must drop the space and relay the field (RFC 9112 §5.1), as
    // hyper's client is told to (`upstream::Http1Pool::connect`).
    let mut config = httparse::ParserConfig::default();
    config.allow_spaces_after_header_name_in_responses(true);
    let head_len = match config.parse_response(&mut parsed, buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(WireError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(WireError::MalformedHead(e)),
    };
    let (fields, count) = fields_within::<N>(buf, parsed.headers);
    let code = parsed.code.unwrap_or_default();
    let status = StatusCode::from_u16(code).map_err(|_| WireError::BadStatus(code))?;
    // Copied: httparse gives a static "" for a missing or non-ASCII reason, and a phrase of its
    // own is rare (the usual one is not kept).
    let reason = parsed
        .reason
        .filter(|r| !r.is_empty() && status.canonical_reason() != Some(*r))
        .map(|r| Bytes::copy_from_slice(r.as_bytes()));
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let head = buf.split_to(head_len).freeze();
    Ok(Some(SplitHead {
        status,
        reason,
        version,
        headers: header_map(&head, &fields[..count], count),
    }))
}

/// The header fields at `fields` in `head`, sharing its bytes, in a map of the worker's kept ones
/// (empty already), else a new one with room for `room` fields. httparse has checked that names
/// are tokens and that values hold no control characters but tab.
pub(in crate::proxy) fn header_map(head: &Bytes, fields: &[FieldAt], room: usize) -> HeaderMap {
    let mut headers = crate::proxy::header_maps::take(room);
    headers.reserve(fields.len());
    for field in fields {
        let span = |(from, to): (u32, u32)| from as usize..to as usize;
        let Ok(name) = crate::proxy::header_names::name(&head[span(field.name)]) else {
            continue;
        };
        let value = head.slice(span(field.value));
        // SAFETY: httparse let through only the bytes a `HeaderValue` may hold (tab, 0x20–0x7e,
        // 0x80–0xff: its `HEADER_VALUE_MAP` is `http`'s `is_valid`), so that a check byte by
        // byte would be done twice. Debug builds (tests, fuzzing) still check.
        headers.append(name, unsafe {
            HeaderValue::from_maybe_shared_unchecked(value)
        });
    }
    headers
}

/// Whether no body follows an answer of `status` to a HEAD (`to_head`) or a CONNECT
/// (`to_connect`) request or any other (RFC 9112 §6.3 items 1 and 2): its length fields frame
/// nothing.
pub(in crate::proxy) fn no_body_follows(
    to_head: bool,
    to_connect: bool,
    status: StatusCode,
) -> bool {
    to_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || (to_connect && status.is_success())
}

/// The body's framing and whether the connection stays usable (RFC 9112 §6.3, §9.3).
fn framed(
    status: StatusCode,
    reason: Option<Bytes>,
    version: Version,
    mut headers: HeaderMap,
    to_head: bool,
) -> Result<AnswerHead, WireError> {
    // Which of the fields that frame the body or keep the connection are there, in one pass
    // over the names: a hashed lookup of each cost more for an answer's few fields.
    let (mut connection, mut coding, mut length) = (false, false, false);
    for name in headers.keys() {
        match *name {
            header::CONNECTION => connection = true,
            header::TRANSFER_ENCODING => coding = true,
            header::CONTENT_LENGTH => length = true,
            _ => {}
        }
    }
    let mut reusable = if connection {
        connection_kept(&headers, version)
    } else {
        version != Version::HTTP_10
    };
    // The agent's own exchange sends no CONNECT, and reads past 1xx heads (`answer_head`).
    let framing = if no_body_follows(to_head, false, status) {
        Framing::Empty
    } else if version == Version::HTTP_10 && coding {
        // Only where a body follows, as hyper's client checks it.
        return Err(WireError::TransferEncodingInHttp10);
    } else if coding {
        if !only_chunked(&headers) {
            return Err(WireError::UnsupportedTransferCoding);
        }
        if headers.remove(header::CONTENT_LENGTH).is_some() {
            // Both: the coding wins, and the connection is not trusted further (§6.3 item 3).
            reusable = false;
        }
        Framing::Chunked
    } else if length {
        match content_length(&headers)? {
            0 => Framing::Empty,
            n => Framing::Length(n),
        }
    } else {
        Framing::UntilClose
    };
    if framing == Framing::UntilClose {
        reusable = false;
    }
    Ok(AnswerHead {
        status,
        reason,
        version,
        headers,
        framing,
        reusable,
    })
}

/// Whether an answer's Transfer-Encoding is one the agent passes on: none, or `chunked` alone,
/// which it decodes. Another coding (`gzip, chunked`) would reach the caller still applied and
/// unnamed once the hop-by-hop field is dropped (an HTTP/2 caller cannot even be told of it): the
/// exchange fails (502), as nginx fails it ("upstream sent unknown Transfer-Encoding").
/// Items are read as hyper's client reads the last one (every comma counts, `chunked,` is two
/// items), and a value that is not text is no `chunked`: whenever this says yes, both exchanges
/// frame the body chunked (the `upstream_answer` fuzz target checks it).
pub(in crate::proxy) fn only_chunked(headers: &HeaderMap) -> bool {
    let mut codings = 0;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let Ok(text) = value.to_str() else {
            return false;
        };
        for coding in text.split(',') {
            codings += 1;
            if codings > 1 || !coding.trim().eq_ignore_ascii_case("chunked") {
                return false;
            }
        }
    }
    true
}

/// With Transfer-Encoding: whether its last coding is chunked (the one that frames the body).
pub(in crate::proxy) fn chunked_last(headers: &HeaderMap) -> Option<bool> {
    let value = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()?;
    let last = value
        .to_str()
        .unwrap_or("")
        .rsplit(',')
        .next()
        .unwrap_or("");
    Some(last.trim().eq_ignore_ascii_case("chunked"))
}

/// One length, however often repeated (`5`, `5, 5`, or two fields of `5`); anything else is an
/// error (§6.3 item 5).
fn content_length(headers: &HeaderMap) -> Result<u64, WireError> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    // One field of plain digits, as nearly every answer has it.
    if let (Some(only), None) = (values.next(), values.next()) {
        if let Some(length) = decimal(only.as_bytes()) {
            return Ok(length);
        }
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let text = value.to_str().map_err(|_| WireError::BadContentLength)?;
        for item in text.split(',') {
            let n = decimal(item.trim().as_bytes()).ok_or(WireError::BadContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(WireError::BadContentLength);
            }
            length = Some(n);
        }
    }
    length.ok_or(WireError::BadContentLength)
}

/// A repeated Content-Length of one value (`5, 5`, or two fields of `5`) becomes one field, as
/// hyper's server makes it (RFC 9110 §8.6): peers refuse a repeat, whatever the value (Node's
/// llhttp as a backend; nghttp2, that is curl, and the `h2` crate fail an HTTP/2 stream on it).
/// Lengths that disagree were refused where the message was read; no length is kept of them.
pub(in crate::proxy) fn one_content_length(headers: &mut HeaderMap) {
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let repeated = match (lengths.next(), lengths.next()) {
        (Some(_), Some(_)) => true,
        (Some(only), None) => only.as_bytes().contains(&b','),
        _ => false,
    };
    if repeated {
        match content_length(headers) {
            Ok(length) => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
            }
            Err(_) => {
                headers.remove(header::CONTENT_LENGTH);
            }
        }
    }
}

/// The headers of one connection, not the message (the engine's list, which header filters
/// do not set either).
pub(in crate::proxy) use gamma_engine::model::HOP_BY_HOP;

/// Whether a trailer field from an HTTP/1.1 peer may be relayed: not one that describes a
/// connection ([`HOP_BY_HOP`], `Upgrade`), which HTTP/2 forbids in any field section (RFC 9113
/// §8.2.2; h2 refuses to send it, and the stream is reset after its whole body went through),
/// nor one that frames or routes the message, which no trailer may carry (RFC 9110 §6.5.1).
pub(in crate::proxy) fn relayable_trailer(name: &HeaderName) -> bool {
    !HOP_BY_HOP.contains(name)
        && !matches!(
            *name,
            header::UPGRADE | header::CONTENT_LENGTH | header::HOST | header::TRAILER
        )
}

/// An answer's Content-Length as the caller gets it: one field ([`one_content_length`]), and none
/// on a 1xx or 204, which have no content (RFC 9110 §8.6: a server MUST NOT send it there; curl
/// fails an HTTP/2 stream whose 204 says a length other than 0).
pub(in crate::proxy) fn answer_content_length(status: StatusCode, headers: &mut HeaderMap) {
    if status.is_informational() || status == StatusCode::NO_CONTENT {
        headers.remove(header::CONTENT_LENGTH);
    } else {
        one_content_length(headers);
    }
}

/// Whether `buf` holds a head's (or trailer section's) end: an empty line (`\n\n` or `\n\r\n`:
/// heads may end lines with a bare LF). Searched from 2 bytes before where a previous search
/// stopped (an end is 3 bytes at most), it keeps reading a head that comes in pieces linear.
pub(in crate::proxy) fn head_ends(buf: &[u8]) -> bool {
    buf.windows(2).enumerate().any(|(i, w)| {
        w[0] == b'\n' && (w[1] == b'\n' || (w[1] == b'\r' && buf.get(i + 2) == Some(&b'\n')))
    })
}

/// A length as HTTP writes it: ASCII digits only (no sign, no space), fitting a u64.
pub(in crate::proxy) fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &digit| {
        let value = digit.checked_sub(b'0').filter(|v| *v < 10)?;
        n.checked_mul(10)?.checked_add(u64::from(value))
    })
}

/// The comma-separated tokens of every `name` field (Connection, TE), trimmed (a value that is
/// not visible ASCII has none: `to_str` refuses it).
pub fn tokens<'h>(headers: &'h HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'h str> {
    tokens_of(headers.get_all(name).iter())
}

/// [`tokens`] of a field's `values`, already found.
fn tokens_of<'h>(values: impl Iterator<Item = &'h HeaderValue>) -> impl Iterator<Item = &'h str> {
    values
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim_ascii)
}

/// Whether a `name` field (Connection, TE) has `token` among its tokens (case-insensitive).
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    has_token_in(headers.get_all(name).iter(), token)
}

/// [`has_token`] in a field's `values`, already found: the value alone first, then split at
/// commas as bytes (no `char` searched for): `Connection: close` is looked at two or three times
/// per request that has it, some 300 instructions each through [`tokens_of`].
pub fn has_token_in<'h>(values: impl Iterator<Item = &'h HeaderValue>, token: &str) -> bool {
    values.into_iter().any(|value| {
        let bytes = value.as_bytes();
        // The usual one: the field is the token alone.
        if bytes.eq_ignore_ascii_case(token.as_bytes()) {
            return true;
        }
        // As `tokens_of`: a value `to_str` refuses has no tokens.
        value.to_str().is_ok_and(|text| {
            text.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    })
}

/// HTTP/1.1 keeps the connection unless it says `close`; HTTP/1.0 only if it says `keep-alive`.
fn connection_kept(headers: &HeaderMap, version: Version) -> bool {
    let has = |option: &str| has_token(headers, &header::CONNECTION, option);
    if version == Version::HTTP_10 {
        has("keep-alive") && !has("close")
    } else {
        !has("close")
    }
}

/// What the body decoder found next in the bytes read.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body ended (without trailers).
    End,
}

/// Cuts an answer's body out of the bytes read from the upstream, frame by frame.
#[derive(Debug)]
pub struct BodyDecoder {
    state: State,
    /// Bytes of the trailer section known not to end it (see [`head_ends`]).
    trailers_searched: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Length(u64),
    UntilClose,
    /// Before a chunk-size line.
    ChunkSize,
    /// Inside a chunk: bytes left.
    ChunkData(u64),
    /// After a chunk's data: its CRLF.
    ChunkEnd,
    /// After the last chunk: the trailer section (usually just CRLF).
    Trailers,
    Done,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        BodyDecoder {
            state,
            trailers_searched: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes of body the upstream still owes, when that is known.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The next frame from `buf`, consuming what it used; `Ok(None)`: more bytes are needed.
    /// Once done, it is `End` and leaves `buf` alone (bytes left there were not the answer's).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, WireError> {
        loop {
            match self.state {
                State::Done => return Ok(Some(Decoded::End)),
                State::Length(left) | State::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = left.min(buf.len() as u64);
                    let data = buf.split_to(take as usize).freeze();
                    self.state = match (self.state, left - take) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), rest) => State::Length(rest),
                        (_, 0) => State::ChunkEnd,
                        (_, rest) => State::ChunkData(rest),
                    };
                    return Ok(Some(Decoded::Data(data)));
                }
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Decoded::Data(buf.split().freeze())));
                }
                State::ChunkSize => {
                    let Some(line_end) = find_crlf(buf, MAX_CHUNK_LINE)? else {
                        return Ok(None);
                    };
                    let size = chunk_size(&buf[..line_end])?;
                    let _ = buf.split_to(line_end + 2);
                    self.state = match size {
                        0 => State::Trailers,
                        n => State::ChunkData(n),
                    };
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(WireError::BadChunk("no CRLF after a chunk's data"));
                    }
                    let _ = buf.split_to(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => return self.trailers(buf),
            }
        }
    }

    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, WireError> {
        if buf.starts_with(b"\r\n") {
            let _ = buf.split_to(2);
            self.state = State::Done;
            return Ok(Some(Decoded::End));
        }
        // Parsed once its end may have come: a section that drips in, parsed whole at each
        // read, would cost the square of its length.
        let searched = self.trailers_searched.saturating_sub(2);
        if !buf.starts_with(b"\n") && !head_ends(&buf[searched..]) {
            if buf.len() > MAX_HEAD {
                return Err(WireError::BadChunk("trailer section too large"));
            }
            self.trailers_searched = buf.len();
            return Ok(None);
        }
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (len, fields) = match httparse::parse_headers(buf, &mut raw) {
            Ok(httparse::Status::Complete((len, fields))) => (len, fields),
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(WireError::BadChunk("trailer section too large"))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(WireError::BadChunk("malformed trailer section")),
        };
        // Stricter than a head, as hyper's client: every line of the section ends with CRLF.
        let bare_lf = buf[..len]
            .iter()
            .enumerate()
            .any(|(i, b)| *b == b'\n' && (i == 0 || buf[i - 1] != b'\r'));
        if bare_lf {
            return Err(WireError::BadChunk("a trailer line not ended by CRLF"));
        }
        let mut trailers = HeaderMap::with_capacity(fields.len());
        for field in fields.iter() {
            let name = crate::proxy::header_names::name(field.name.as_bytes());
            let value = HeaderValue::from_bytes(field.value);
            let (Ok(name), Ok(value)) = (name, value) else {
                return Err(WireError::BadChunk("malformed trailer field"));
            };
            if relayable_trailer(&name) {
                trailers.append(name, value);
            }
        }
        let _ = buf.split_to(len);
        self.state = State::Done;
        Ok(Some(Decoded::Trailers(trailers)))
    }

    /// The upstream closed the connection: the end of a body delimited by that, else an error.
    pub fn closed(&mut self) -> Result<(), WireError> {
        match self.state {
            State::UntilClose | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(WireError::ClosedEarly),
        }
    }
}

/// Where the CRLF of the line at the start of `buf` is; an error if the line runs past `max`.
fn find_crlf(buf: &[u8], max: usize) -> Result<Option<usize>, WireError> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(at) if at <= max => Ok(Some(at)),
        None if buf.len() <= max => Ok(None),
        _ => Err(WireError::BadChunk("chunk-size line too long")),
    }
}

/// `1*HEXDIG [ BWS ";" extensions ]` (extensions are ignored). As hyper's client reads it: any
/// number of leading zeros, and any byte in the extensions but a CR or LF.
fn chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let zeros = line[..digits].iter().take_while(|b| **b == b'0').count();
    let significant = &line[zeros.min(digits.saturating_sub(1))..digits];
    let rest = &line[digits..];
    let after = rest.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let extensions_only = after.is_none_or(|i| rest[i] == b';');
    // A bare CR or LF inside would frame the body differently for another reader.
    let line_break = rest.iter().any(|b| matches!(b, b'\r' | b'\n'));
    if digits == 0 || significant.len() > 16 || !extensions_only || line_break {
        return Err(WireError::BadChunk("invalid chunk size"));
    }
    let hex = std::str::from_utf8(significant).expect("hex digits are ASCII");
    u64::from_str_radix(hex, 16).map_err(|_| WireError::BadChunk("invalid chunk size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, to_head: bool) -> (Result<Option<AnswerHead>, WireError>, BytesMut) {
        let mut buf = BytesMut::from(text.as_bytes());
        (answer_head(&mut buf, to_head), buf)
    }

    fn framing(text: &str) -> (Framing, bool) {
        let answer = head(text, false).0.unwrap().unwrap();
        (answer.framing, answer.reusable)
    }

    #[test]
    fn a_request_head_is_the_method_target_and_fields() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("catalog"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let mut out = Vec::new();
        let target = |t: &'static str| Some(http::uri::PathAndQuery::from_static(t));
        request_head(
            &Method::GET,
            (None, target("/p?q=1").as_ref()),
            &headers,
            None,
            &mut out,
        );
        assert_eq!(
            out,
            b"GET /p?q=1 HTTP/1.1\r\nhost: catalog\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
        // An absolute URI's empty path is `/`, also before a query.
        let uri: http::Uri = "http://svc?x=1".parse().unwrap();
        request_head(
            &Method::GET,
            (None, uri.path_and_query()),
            &HeaderMap::new(),
            None,
            &mut out,
        );
        assert_eq!(out, b"GET /?x=1 HTTP/1.1\r\n\r\n");
        request_head(
            &Method::POST,
            (None, None),
            &HeaderMap::new(),
            Some("svc"),
            &mut out,
        );
        assert_eq!(
            out,
            b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 0\r\n\r\n"
        );
        // What an HTTP/2 caller sends: crumbs of Cookie, TE: trailers.
        let mut h2 = HeaderMap::new();
        h2.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h2.append(header::TE, HeaderValue::from_static("trailers"));
        h2.append("x-b", HeaderValue::from_static("2"));
        h2.append(header::COOKIE, HeaderValue::from_static("b=2"));
        // A caller's absolute-form target, for the Host the filters left.
        let mut absolute = http::Request::get("http://example.com/x?y=1")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        absolute
            .headers
            .insert(header::HOST, HeaderValue::from_static("example.org"));
        let target = (absolute_origin(&absolute), absolute.uri.path_and_query());
        request_head(&Method::GET, target, &HeaderMap::new(), None, &mut out);
        assert_eq!(out, b"GET http://example.org/x?y=1 HTTP/1.1\r\n\r\n");
        absolute.uri = "/x".parse().unwrap();
        assert_eq!(absolute_origin(&absolute), None, "origin form");
        request_head(&Method::GET, (None, None), &h2, Some("svc:80"), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nhost: svc:80\r\ncookie: a=1; b=2\r\nte: trailers\r\nconnection: te\r\nx-b: 2\r\n\r\n"
        );
    }

    #[test]
    fn an_answer_head_is_split_off_and_its_values_share_the_bytes_read() {
        let (answer, rest) = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Thing: a b\r\nx-thing: c\r\n\r\nokNEXT",
            false,
        );
        let answer = answer.unwrap().unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.reason, None, "the usual phrase");
        assert_eq!(answer.version, Version::HTTP_11);
        let things: Vec<_> = answer.headers.get_all("x-thing").iter().collect();
        assert_eq!(things, ["a b", "c"]);
        assert_eq!(
            (answer.framing, answer.reusable),
            (Framing::Length(2), true)
        );
        assert_eq!(&rest[..], b"okNEXT");
    }

    #[test]
    fn an_incomplete_head_waits_and_an_endless_one_is_refused() {
        let (answer, rest) = head("HTTP/1.1 200 OK\r\nContent-Le", false);
        assert!(answer.unwrap().is_none());
        assert_eq!(rest.len(), 27, "nothing consumed");
        let endless = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert_eq!(
            head(&endless, false).0.unwrap_err(),
            WireError::HeadTooLarge
        );
        assert!(matches!(
            head("HTTP/1.1 2x0 OK\r\n\r\n", false).0,
            Err(WireError::MalformedHead(_))
        ));
    }

    #[test]
    fn an_answer_with_many_fields_gets_room_for_them() {
        let fields: String = (0..40).map(|i| format!("x-{i}: {i}\r\n")).collect();
        let text = format!("HTTP/1.1 200 OK\r\n{fields}content-length: 0\r\n\r\n");
        let answer = head(&text, false).0.unwrap().unwrap();
        assert_eq!(answer.headers.len(), 41);
        assert_eq!(answer.headers["x-39"], "39");
        let fields: String = (0..MAX_HEADERS)
            .map(|i| format!("x-{i}: {i}\r\n"))
            .collect();
        let text = format!("HTTP/1.1 200 OK\r\n{fields}content-length: 0\r\n\r\n");
        assert_eq!(
            head(&text, false).0.unwrap_err(),
            WireError::MalformedHead(httparse::Error::TooManyHeaders)
        );
    }

    #[test]
    fn informational_answers_are_skipped_and_101_is_refused() {
        let (answer, rest) = head(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            false,
        );
        let answer = answer.unwrap().unwrap();
        assert_eq!(answer.status, StatusCode::NO_CONTENT);
        assert!(!answer.headers.contains_key("link"));
        assert!(rest.is_empty());
        let (partial, rest) = head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2", false);
        assert!(partial.unwrap().is_none());
        assert_eq!(&rest[..], b"HTTP/1.1 2", "the 100 is consumed");
        let upgrade = "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n";
        assert_eq!(
            head(upgrade, false).0.unwrap_err(),
            WireError::UnaskedUpgrade
        );
    }

    /// Found by the `upstream_answer` fuzz target: `chunked` followed by a byte that is not
    /// text was taken for no coding at all (the own exchange then decoded chunks, hyper's read
    /// to the close).
    #[test]
    fn only_chunked_alone_as_text_is_chunked() {
        let with = |values: &[&[u8]]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_bytes(value).unwrap(),
                );
            }
            only_chunked(&headers)
        };
        assert!(with(&[]));
        assert!(with(&[b"chunked"]) && with(&[b" Chunked "]));
        for other in [
            &[&b"chunked\xff"[..]][..],
            &[b"chunked,"],
            &[b"gzip, chunked"],
            &[b"chunked", b"chunked"],
        ] {
            assert!(!with(other), "{other:?}");
        }
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let keep = true;
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n"),
            (Framing::Length(5), keep)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            (Framing::Empty, keep)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n"),
            (Framing::Chunked, keep)
        );
        // Both: the coding wins, Content-Length is dropped, the connection is not reused.
        let (both, _) = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        );
        let both = both.unwrap().unwrap();
        assert_eq!((both.framing, both.reusable), (Framing::Chunked, false));
        assert!(!both.headers.contains_key(header::CONTENT_LENGTH));
        // Codings the agent does not decode, where a body follows, and not otherwise.
        for codings in ["gzip, chunked", "gzip", "chunked, chunked"] {
            let text = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {codings}\r\n\r\n");
            assert_eq!(
                head(&text, false).0.unwrap_err(),
                WireError::UnsupportedTransferCoding,
                "{codings}"
            );
            let text = format!("HTTP/1.1 204 No Content\r\ntransfer-encoding: {codings}\r\n\r\n");
            assert_eq!(framing(&text), (Framing::Empty, keep), "{codings}");
        }
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\n\r\n"),
            (Framing::UntilClose, false)
        );
        assert_eq!(
            framing("HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n"),
            (Framing::Empty, keep)
        );
        let (to_head, _) = head("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true);
        assert_eq!(to_head.unwrap().unwrap().framing, Framing::Empty);
        for bad in ["5, 6", "-1", "", "0x5"] {
            let text = format!("HTTP/1.1 200 OK\r\ncontent-length: {bad}\r\n\r\n");
            assert_eq!(
                head(&text, false).0.unwrap_err(),
                WireError::BadContentLength
            );
        }
        let (teapot, _) = head(
            "HTTP/1.1 200 Fine Indeed\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert_eq!(teapot.unwrap().unwrap().reason.unwrap(), "Fine Indeed");
        let twice = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n";
        assert_eq!(
            head(twice, false).0.unwrap_err(),
            WireError::BadContentLength
        );
    }

    #[test]
    fn connection_reuse_follows_the_version_and_its_options() {
        let close = "HTTP/1.1 200 OK\r\nconnection: keep-alive, close\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(framing(close), (Framing::Empty, false));
        let old = "HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(framing(old), (Framing::Empty, false));
        let old_kept = "HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(framing(old_kept), (Framing::Empty, true));
    }

    /// Feeds `wire` to a decoder `step` bytes at a time; the frames it gives, then whether it ended.
    fn decode_in_steps(framing: Framing, wire: &[u8], step: usize) -> (Vec<Decoded>, BytesMut) {
        let mut decoder = BodyDecoder::new(framing);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                if frame == Decoded::End {
                    return (frames, buf);
                }
                let trailers = matches!(frame, Decoded::Trailers(_));
                frames.push(frame);
                if trailers {
                    assert!(decoder.is_done());
                    return (frames, buf);
                }
            }
        }
        panic!("no end in {wire:?}");
    }

    fn data_of(frames: &[Decoded]) -> Vec<u8> {
        frames
            .iter()
            .filter_map(|f| match f {
                Decoded::Data(d) => Some(&d[..]),
                _ => None,
            })
            .flatten()
            .copied()
            .collect()
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads() {
        let wire = b"5;ext=1\r\nhello\r\n1 \r\n \r\n6\r\nworld!\r\n0\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, wire.len()] {
            let (frames, rest) = decode_in_steps(Framing::Chunked, wire, step);
            assert_eq!(data_of(&frames), b"hello world!", "step {step}");
            assert!(frames.iter().all(|f| !matches!(f, Decoded::Trailers(_))));
            assert!(b"NEXT".starts_with(&rest), "step {step}");
        }
    }

    /// As hyper's client: HTTP/1.0 with Transfer-Encoding is refused only where a body follows
    /// (a HEAD's answer, 204, 304 have none: relayed, not 502).
    #[test]
    fn an_http1_0_answer_without_a_body_may_name_a_transfer_coding() {
        let bodiless = b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        let head = answer_head(&mut BytesMut::from(&bodiless[..]), true)
            .unwrap()
            .unwrap();
        assert_eq!(
            (head.status, head.framing),
            (StatusCode::OK, Framing::Empty)
        );
        let not_modified = b"HTTP/1.0 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n";
        let head = answer_head(&mut BytesMut::from(&not_modified[..]), false)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Empty);
        assert_eq!(
            answer_head(&mut BytesMut::from(&bodiless[..]), false).err(),
            Some(WireError::TransferEncodingInHttp10)
        );
    }

    #[test]
    fn chunked_trailers_become_a_trailers_frame() {
        let wire = b"2\r\nok\r\n0\r\ngrpc-status: 0\r\ngrpc-message: fine\r\n\r\n";
        for step in [1, 5, wire.len()] {
            let (frames, rest) = decode_in_steps(Framing::Chunked, wire, step);
            assert_eq!(data_of(&frames), b"ok");
            let Some(Decoded::Trailers(trailers)) = frames.last() else {
                panic!("no trailers at step {step}: {frames:?}");
            };
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["grpc-message"], "fine");
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for wire in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"5 x\r\n",
            b"2;a\nb\r\nok\r\n0\r\n\r\n",
            b"2;a\rb\r\nok\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"0\r\nbad trailer\r\n\r\n",
            // Trailer lines end with CRLF, as hyper's client requires.
            b"0\r\ngrpc-status: 0\n\r\n",
            b"0\r\ngrpc-status: 0\r\n\n",
            b"0\r\n\n",
        ] {
            let mut decoder = BodyDecoder::new(Framing::Chunked);
            let mut buf = BytesMut::from(wire);
            let result = std::iter::from_fn(|| Some(decoder.decode(&mut buf)))
                .find(|r| !matches!(r, Ok(Some(Decoded::Data(_)))));
            assert!(
                matches!(result, Some(Err(WireError::BadChunk(_)))),
                "{wire:?}: {result:?}"
            );
        }
        let mut decoder = BodyDecoder::new(Framing::Chunked);
        let long = BytesMut::from(&[b'1'; MAX_CHUNK_LINE + 1][..]);
        assert!(decoder.decode(&mut long.clone()).is_err());
    }

    /// What hyper's client reads, the agent's own exchange reads too: a size with any number of
    /// leading zeros, extensions with control bytes other than CR and LF.
    #[test]
    fn chunk_sizes_hyper_accepts_are_read() {
        for wire in [
            &b"00000000000000000000002\r\nok\r\n0000\r\n\r\n"[..],
            b"2;x=\x01\x7f\r\nok\r\n0\r\n\r\n",
            b"2 \t;x\r\nok\r\n0\r\n\r\n",
        ] {
            let (frames, rest) = decode_in_steps(Framing::Chunked, wire, 4);
            assert_eq!(data_of(&frames), b"ok", "{wire:?}");
            assert!(rest.is_empty(), "{wire:?}");
        }
    }

    #[test]
    fn length_and_close_delimited_bodies() {
        for step in [1, 3, 9] {
            let (frames, rest) = decode_in_steps(Framing::Length(5), b"helloNEXT", step);
            assert_eq!(data_of(&frames), b"hello");
            assert!(b"NEXT".starts_with(&rest), "bytes after the body are left");
        }
        let mut decoder = BodyDecoder::new(Framing::Length(5));
        let mut buf = BytesMut::from(&b"hel"[..]);
        assert!(matches!(
            decoder.decode(&mut buf),
            Ok(Some(Decoded::Data(_)))
        ));
        assert_eq!(decoder.remaining(), Some(2));
        assert_eq!(decoder.closed(), Err(WireError::ClosedEarly));
        let mut decoder = BodyDecoder::new(Framing::UntilClose);
        let mut buf = BytesMut::from(&b"all of it"[..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Decoded::Data(Bytes::from_static(b"all of it"))))
        );
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert_eq!(decoder.closed(), Ok(()));
        assert!(decoder.is_done());
        assert!(BodyDecoder::new(Framing::Empty).is_done());
    }

    #[test]
    fn a_token_is_found_as_in_the_fields_str_tokens() {
        let values: &[&[u8]] = &[
            b"close",
            b"Close",
            b" keep-alive ,  CLOSE ",
            b"closed",
            b"x-close, upgrade",
            b"\tclose\t",
            b",,close,,",
            b"",
            b"close, caf\xc3\xa9",
            b"trailers;q=0.5, trailers",
        ];
        for first in values {
            for second in [None, Some(b"close".as_slice()), Some(b"\x80, trailers")] {
                let fields: Vec<HeaderValue> = std::iter::once(*first)
                    .chain(second)
                    .map(|v| HeaderValue::from_bytes(v).unwrap())
                    .collect();
                for token in ["close", "keep-alive", "upgrade", "trailers"] {
                    let by_str = tokens_of(fields.iter()).any(|t| t.eq_ignore_ascii_case(token));
                    assert_eq!(
                        has_token_in(fields.iter(), token),
                        by_str,
                        "{token} in {fields:?}"
                    );
                }
            }
        }
    }
}
