//! The body types that flow through the proxy: streamed from the peer, or made by the agent;
//! request bodies kept while they stream (for retries and mirrors); response bodies bounded by
//! the route's timeouts.

use super::local::{grpc_message, GrpcStatus};
use super::upstream::wire::relayable_trailer;
use crate::telemetry::requests::GrpcCounts;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::watch;
use tokio::time::Instant;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request and response bodies, streamed (never buffered whole) or produced locally.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// What polling a [`ProxyBody`] for its next frame gives.
type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

pub fn empty() -> ProxyBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn full(text: impl Into<Bytes>) -> ProxyBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An HTTP/1.1 peer's body as hyper's client reads it, streamed, its trailers without the
/// fields that may not be relayed ([`relayable_trailer`]), as the agent's own exchange reads
/// them.
pub fn stream_http1<T: Send + Unpin + 'static>(body: Incoming, held: T) -> ProxyBody {
    Relayed { body, _held: held }
        .map_frame(relayable)
        .map_err(BoxError::from)
        .boxed_unsync()
}

/// `frame` as it may be relayed: trailers without the fields that may not be
/// ([`relayable_trailer`]). hyper's HTTP/1.1 parser passes them all, answers' and requests'
/// alike; h2 refuses to send one, and a request's stream to an HTTP/2 backend was then left
/// without its end, the backend waiting for the rest of the body.
fn relayable(frame: Frame<Bytes>) -> Frame<Bytes> {
    match frame.into_trailers() {
        Ok(mut trailers) => {
            let unrelayable: Vec<HeaderName> = trailers
                .keys()
                .filter(|name| !relayable_trailer(name))
                .cloned()
                .collect();
            for name in unrelayable {
                trailers.remove(name);
            }
            Frame::trailers(trailers)
        }
        Err(frame) => frame,
    }
}

/// `body`, streamed, keeping `held` until it is dropped.
pub fn holding<T: Send + Unpin + 'static>(body: Incoming, held: T) -> ProxyBody {
    Relayed { body, _held: held }
        .map_err(BoxError::from)
        .boxed_unsync()
}

/// A peer's body streamed on, keeping `_held` while it is.
struct Relayed<T> {
    body: Incoming,
    _held: T,
}

impl<T> Body for Relayed<T>
where
    T: Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A caller's body kept nowhere, lent to one attempt at a time: an attempt that ends before
/// reading any of it (its connect failed; its backend refused the stream before its body) gives
/// it back, and the next attempt sends it whole. Without this, a request with a streamed body
/// (every gRPC call and HTTP/2 upload without a retry policy) could not go to another endpoint
/// when the first refused its connection, as a bodiless one does.
pub struct Lender {
    unread: Mutex<Option<Incoming>>,
    progress: CallerProgress,
}

struct Lent {
    /// Until dropped.
    body: Option<Incoming>,
    lender: Arc<Lender>,
    read_any: bool,
}

impl Lender {
    fn lend(self: &Arc<Self>) -> Option<ProxyBody> {
        let body = self
            .unread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        let lent = Lent {
            body: Some(body),
            lender: self.clone(),
            read_any: false,
        };
        Some(lent.map_err(BoxError::from).boxed_unsync())
    }
}

impl Body for Lent {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        let read = Pin::new(body).poll_frame(cx);
        self.lender.progress.record(&read);
        self.read_any |= read.is_ready();
        read.map(|frame| frame.map(|frame| frame.map(relayable)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if !self.read_any {
            *self.lender.unread.lock().unwrap_or_else(|p| p.into_inner()) = self.body.take();
        }
    }
}

/// How reading a request body from its caller goes, as its last read found it.
#[derive(Default)]
pub struct CallerProgress(AtomicU8);

impl CallerProgress {
    /// A frame came, or nothing was read yet: not waiting on the caller.
    const READING: u8 = 0;
    /// The last read found nothing: waiting on the caller's next bytes.
    const WAITING: u8 = 1;
    const ENDED: u8 = 2;
    /// Reading failed: the caller closed its side mid-body, reset its stream, or sent a
    /// malformed chunk.
    const BROKE_OFF: u8 = 3;

    fn record<T, E>(&self, read: &Poll<Option<Result<T, E>>>) {
        let state = match read {
            Poll::Pending => Self::WAITING,
            Poll::Ready(None) => Self::ENDED,
            Poll::Ready(Some(Err(_))) => Self::BROKE_OFF,
            Poll::Ready(Some(Ok(_))) => Self::READING,
        };
        self.0.store(state, Ordering::Relaxed);
    }

    fn reading(&self) {
        self.0.store(Self::READING, Ordering::Relaxed);
    }

    fn get(&self) -> u8 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A request's body as the server that read the request has it.
pub enum CallerBody {
    None,
    /// hyper's server's, read as it streams.
    Streaming(Incoming),
    /// Read whole with its head (the agent's own HTTP/1.1 server: a small body with a length).
    Whole(Bytes),
}

/// A request body, as the attempts and mirrors of one request see it.
pub enum RequestBody {
    /// None at all: every attempt and mirror sends an empty body.
    Empty,
    /// Read whole before the request was handled: every attempt and mirror sends it again.
    Whole(Bytes),
    /// Streamed once, kept nowhere (no retry, no mirror and no refused gRPC stream's resend
    /// needs it): only an attempt that read none of it gives it back for the next one.
    Streamed(Arc<Lender>),
    /// Streamed to the first attempt and kept as it goes, up to a limit.
    Recorded(Recording),
}

impl RequestBody {
    /// `keep`: a retry, a mirror or a refused gRPC stream's resend may need the body again; it
    /// is kept up to `limit` bytes.
    pub fn new(body: CallerBody, keep: bool, limit: usize) -> Self {
        let body = match body {
            CallerBody::Streaming(body) if !body.is_end_stream() => body,
            CallerBody::Whole(bytes) if !bytes.is_empty() => return RequestBody::Whole(bytes),
            _ => return RequestBody::Empty,
        };
        if keep {
            RequestBody::Recorded(Recording::new(body, limit))
        } else {
            RequestBody::Streamed(Arc::new(Lender {
                unread: Mutex::new(Some(body)),
                progress: CallerProgress::default(),
            }))
        }
    }

    /// The body for the next attempt; `None` when it cannot be sent again.
    pub fn next_attempt(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Empty => Some(empty()),
            RequestBody::Whole(bytes) => Some(full(bytes.clone())),
            RequestBody::Streamed(lender) => lender.lend(),
            RequestBody::Recorded(recording) => recording.replay(),
        }
    }

    /// Whether reading the body from the caller failed before its end: the caller closed its
    /// side mid-body, reset its stream, or sent a malformed chunk. An attempt that failed then
    /// failed for the caller, not for its endpoint.
    pub fn caller_broke_off(&self) -> bool {
        self.progress() == Some(CallerProgress::BROKE_OFF)
    }

    /// Whether the last read of the body found none of the caller's bytes yet: an attempt that
    /// timed out now had an incomplete request (a slow upload, a gRPC client stream between its
    /// messages), which no endpoint could have answered in time. Its endpoint may be stuck as
    /// well (what was sent may sit unread in socket buffers); this cannot tell.
    pub fn waiting_on_caller(&self) -> bool {
        self.progress() == Some(CallerProgress::WAITING)
    }

    fn progress(&self) -> Option<u8> {
        match self {
            RequestBody::Empty | RequestBody::Whole(_) => None,
            RequestBody::Streamed(lender) => Some(lender.progress.get()),
            RequestBody::Recorded(r) => Some(r.lock().progress.get()),
        }
    }

    /// The request was answered: no attempt follows, so what is kept for one goes as soon as
    /// the attempt streaming the body has sent it (now, if it has), and nothing more is kept (a
    /// gRPC stream, whose body is kept for a refused stream's resends, kept its first 64 KiB of
    /// messages for its life). A mirror still waiting for the whole body keeps it coming.
    pub fn answered(&self) {
        if let RequestBody::Recorded(recording) = self {
            let mut shared = recording.lock();
            shared.answered = true;
            // Not once the body ended: the attempt may have its trailers still to send.
            if !shared.ended && shared.sent == shared.kept.chunks.len() {
                shared.stop_keeping();
            }
        }
    }

    /// What a mirror waits on: the whole body once the caller has sent it.
    pub fn for_mirror(&self) -> MirrorBody {
        match self {
            RequestBody::Empty => MirrorBody::Empty,
            RequestBody::Whole(bytes) => MirrorBody::Whole(bytes.clone()),
            RequestBody::Streamed(_) => MirrorBody::Unavailable,
            RequestBody::Recorded(r) => MirrorBody::Pending(r.complete.subscribe()),
        }
    }
}

/// A request body a mirror will send.
pub enum MirrorBody {
    Empty,
    Whole(Bytes),
    /// Not kept (no mirror was planned when the request was read).
    Unavailable,
    /// Resolves once the caller's body has ended (or was not kept after all).
    Pending(watch::Receiver<Kept>),
}

impl MirrorBody {
    /// The whole body, once the caller has sent it; `None` if it was not kept (over the limit,
    /// failed, or abandoned before its end).
    pub async fn whole(self) -> Option<ProxyBody> {
        match self {
            MirrorBody::Empty => Some(empty()),
            MirrorBody::Whole(bytes) => Some(full(bytes)),
            MirrorBody::Unavailable => None,
            MirrorBody::Pending(mut complete) => {
                let kept = complete
                    .wait_for(|k| !matches!(k, Kept::Streaming))
                    .await
                    .ok()?
                    .clone();
                match kept {
                    Kept::Whole(recorded) => Some(Replay::whole(recorded).boxed_unsync()),
                    Kept::Streaming | Kept::Not => None,
                }
            }
        }
    }
}

/// Where keeping a request body stands.
#[derive(Clone)]
pub enum Kept {
    Streaming,
    Whole(Arc<Recorded>),
    /// Over the limit, failed, or abandoned before its end.
    Not,
}

/// A body as the caller sent it.
#[derive(Default)]
pub struct Recorded {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
}

/// A request body read once from the caller and kept (up to a limit) while it streams to the
/// first attempt, so that a retry can send it again (replaying what was kept, then reading on
/// from the caller) and a mirror can send a copy once it is whole. Attempts run one after
/// another, so one replay at a time reads from the caller.
pub struct Recording {
    shared: Arc<Mutex<Shared>>,
    complete: watch::Sender<Kept>,
}

struct Shared {
    /// The caller's body, until it ends.
    source: Option<Incoming>,
    kept: Recorded,
    size: usize,
    limit: usize,
    /// Larger than `limit`, or answered (`RequestBody::answered`) and sent: nothing is kept any
    /// more.
    overflowed: bool,
    /// The request was answered (`RequestBody::answered`).
    answered: bool,
    /// Kept chunks the latest attempt has sent.
    sent: usize,
    ended: bool,
    /// How reading from the caller goes (see `RequestBody::caller_broke_off`).
    progress: CallerProgress,
    /// The length the caller announced, for every replay's size hint.
    length: Option<u64>,
    /// Replays made so far: only the latest may read on from the caller.
    replays: u64,
    complete: watch::Sender<Kept>,
}

impl Shared {
    /// Drops what is kept and keeps nothing more, once answered and no mirror waits for it (a
    /// mirror that gave up no longer does).
    fn stop_keeping(&mut self) {
        if self.answered && !self.overflowed && self.complete.receiver_count() == 0 {
            self.overflowed = true;
            self.kept = Recorded::default();
            self.sent = 0;
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The request is over: a mirror still waiting for the body will not get it.
        self.complete.send_if_modified(|k| {
            let waiting = matches!(k, Kept::Streaming);
            if waiting {
                *k = Kept::Not;
            }
            waiting
        });
    }
}

impl Recording {
    fn new(source: Incoming, limit: usize) -> Self {
        let (complete, _) = watch::channel(Kept::Streaming);
        let length = source.size_hint().exact();
        Recording {
            shared: Arc::new(Mutex::new(Shared {
                source: Some(source),
                kept: Recorded::default(),
                size: 0,
                limit,
                overflowed: false,
                answered: false,
                sent: 0,
                ended: false,
                progress: CallerProgress::default(),
                length,
                replays: 0,
                complete: complete.clone(),
            })),
            complete,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().expect("not poisoned")
    }

    /// A body that sends what was kept, then reads on from the caller; `None` once part of the
    /// body was not kept.
    fn replay(&self) -> Option<ProxyBody> {
        let mut shared = self.lock();
        if shared.overflowed {
            return None;
        }
        shared.replays += 1;
        // Nothing kept is sent by this attempt yet (`answered` must not drop it meanwhile).
        shared.sent = 0;
        // This attempt has not read the caller yet: what the last one found is not its own.
        shared.progress.reading();
        Some(
            Replay {
                source: Source::Recording(self.shared.clone()),
                generation: shared.replays,
                next_chunk: 0,
                trailers_sent: false,
            }
            .boxed_unsync(),
        )
    }
}

enum Source {
    Recording(Arc<Mutex<Shared>>),
    Whole(Arc<Recorded>),
}

/// A kept body sent again: the chunks kept, then (while recording) the rest from the caller.
struct Replay {
    source: Source,
    /// Which replay of the recording this is (unused for a whole body).
    generation: u64,
    next_chunk: usize,
    trailers_sent: bool,
}

impl Replay {
    fn whole(recorded: Arc<Recorded>) -> Self {
        Replay {
            source: Source::Whole(recorded),
            generation: 0,
            next_chunk: 0,
            trailers_sent: false,
        }
    }

    /// The next kept frame, if this replay has not sent it yet.
    fn kept_frame(&mut self, kept: &Recorded, ended: bool) -> Option<Frame<Bytes>> {
        if let Some(chunk) = kept.chunks.get(self.next_chunk) {
            self.next_chunk += 1;
            return Some(Frame::data(chunk.clone()));
        }
        if ended && !self.trailers_sent {
            self.trailers_sent = true;
            return kept.trailers.clone().map(Frame::trailers);
        }
        None
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = self.get_mut();
        let shared = match &this.source {
            Source::Whole(recorded) => {
                let recorded = recorded.clone();
                return Poll::Ready(this.kept_frame(&recorded, true).map(Ok));
            }
            Source::Recording(shared) => shared.clone(),
        };
        let mut shared = shared.lock().expect("not poisoned");
        let shared = &mut *shared;
        if this.generation != shared.replays {
            // A retry took over; this attempt's connection may still be sending, but not this.
            return Poll::Ready(Some(Err("the request body went to a retry".into())));
        }
        let kept = this.kept_frame(&shared.kept, shared.ended);
        shared.sent = this.next_chunk;
        if let Some(frame) = kept {
            return Poll::Ready(Some(Ok(frame)));
        }
        if shared.ended {
            return Poll::Ready(None);
        }
        // All that was kept is sent: no attempt will need it again once answered.
        shared.stop_keeping();
        let Some(source) = shared.source.as_mut() else {
            return Poll::Ready(Some(Err("the request body is gone".into())));
        };
        let polled = Pin::new(source).poll_frame(cx);
        shared.progress.record(&polled);
        let frame = match polled {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                shared.ended = true;
                shared.source = None;
                this.trailers_sent = true;
                if !shared.overflowed {
                    let whole = Recorded {
                        chunks: shared.kept.chunks.clone(),
                        trailers: shared.kept.trailers.clone(),
                    };
                    shared.complete.send_replace(Kept::Whole(Arc::new(whole)));
                }
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => {
                shared.overflowed = true;
                shared.complete.send_replace(Kept::Not);
                return Poll::Ready(Some(Err(e.into())));
            }
            Poll::Ready(Some(Ok(frame))) => relayable(frame),
        };
        if let Some(data) = frame.data_ref() {
            if !shared.overflowed {
                if shared.size + data.len() > shared.limit {
                    shared.overflowed = true;
                    shared.kept = Recorded::default();
                    shared.complete.send_replace(Kept::Not);
                } else {
                    shared.size += data.len();
                    shared.kept.chunks.push(data.clone());
                }
            }
            this.next_chunk = shared.kept.chunks.len();
            shared.sent = this.next_chunk;
        } else if let Some(trailers) = frame.trailers_ref() {
            shared.kept.trailers = Some(trailers.clone());
            this.trailers_sent = true;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn size_hint(&self) -> SizeHint {
        let length = match &self.source {
            Source::Whole(recorded) => Some(recorded.chunks.iter().map(|c| c.len() as u64).sum()),
            Source::Recording(shared) => shared.lock().expect("not poisoned").length,
        };
        length.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// A forwarded answer's body, held to how it must end:
/// - by `deadline`, if any (the route's timeouts cover the whole response: "when the full
///   response has been received"). Past it, a gRPC answer ends with DEADLINE_EXCEEDED trailers;
///   any other fails, so the caller sees the answer cut short (HTTP/1.1: the connection closes
///   before the body's end; HTTP/2: RST_STREAM). A timer of its own lets go of the backend's
///   side at the deadline (its connection or stream, its count on the endpoint) even while the
///   caller reads nothing: no server polls a body whose caller's socket or window is full, and
///   a caller that stopped reading held them past the timeout, for as long as it liked;
/// - for gRPC, a backend connection that broke before the end (not a reset the backend chose,
///   whose code goes to the caller as it is) ends it with UNAVAILABLE trailers: what a client
///   talking to the backend itself reports for a lost connection, and what watch and retry logic
///   acts on. Failed, the caller's stream would be reset INTERNAL_ERROR: INTERNAL.
///
/// Trailers of the agent's own must fall between gRPC messages (PROTOCOL-HTTP2: a response is
/// whole length-prefixed messages, then trailers): a client that reads a message cut short
/// reports INTERNAL and never reads them. A message that spans DATA frames is therefore held
/// until it is whole, up to [`GRPC_HELD_MESSAGE`]; one larger goes on as it comes, and a cut in
/// its middle resets the stream instead.
pub struct AnswerEnd {
    inner: Inner,
    /// gRPC answers only.
    messages: Option<GrpcMessages>,
    ended: bool,
}

/// An answer's body from its backend.
enum Inner {
    Owned(ProxyBody),
    /// Under a deadline: taken from the slot and dropped by the timer at it, which then wakes
    /// whoever last polled the answer.
    Timed {
        slot: Arc<Mutex<TimedSlot>>,
        timer: tokio::task::AbortHandle,
    },
}

struct TimedSlot {
    body: Option<ProxyBody>,
    waker: Option<std::task::Waker>,
}

impl Inner {
    fn timed(body: ProxyBody, deadline: Instant) -> Inner {
        let slot = Arc::new(Mutex::new(TimedSlot {
            // Already past (the answer's head came at the deadline): let go at once.
            body: (deadline > Instant::now()).then_some(body),
            waker: None,
        }));
        let expires = slot.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            let (body, waker) = {
                let mut slot = expires.lock().expect("not poisoned");
                (slot.body.take(), slot.waker.take())
            };
            drop(body);
            if let Some(waker) = waker {
                waker.wake();
            }
        })
        .abort_handle();
        Inner::Timed { slot, timer }
    }

    /// The body's next frame; `None` once the deadline took it.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Option<Polled> {
        match self {
            Inner::Owned(body) => Some(Pin::new(body).poll_frame(cx)),
            Inner::Timed { slot, .. } => {
                let slot = &mut *slot.lock().expect("not poisoned");
                let body = slot.body.as_mut()?;
                if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    slot.waker = Some(cx.waker().clone());
                }
                Some(Pin::new(body).poll_frame(cx))
            }
        }
    }

    /// What `f` says of the body, or `expired` once the deadline took it.
    fn read<T>(&self, f: impl FnOnce(&ProxyBody) -> T, expired: T) -> T {
        match self {
            Inner::Owned(body) => f(body),
            Inner::Timed { slot, .. } => slot
                .lock()
                .expect("not poisoned")
                .body
                .as_ref()
                .map_or(expired, f),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Inner::Timed { timer, .. } = self {
            timer.abort();
        }
    }
}

/// A gRPC message this large at most is held until whole (a larger one streams on).
pub const GRPC_HELD_MESSAGE: u64 = 64 * 1024;

/// Where a gRPC answer's bytes stand in its length-prefixed messages, and what is held of the
/// message in progress.
#[derive(Default)]
struct GrpcMessages {
    /// The current message's 5-byte prefix (flag, then the length), as far as seen.
    prefix: [u8; 5],
    prefix_seen: usize,
    /// Bytes of the current message's payload still to come.
    remaining: u64,
    /// The start of the current message, not sent yet.
    held: bytes::BytesMut,
    /// Some of the current message went to the caller already (one larger than the hold).
    sent_partly: bool,
    /// A frame to send once `held` went: the backend's trailers or end, after a message cut
    /// short by the backend itself (its own bytes go as they are).
    after_held: Option<Option<Frame<Bytes>>>,
}

impl GrpcMessages {
    /// Follows `data`; returns the offset just past the last message it completes (0: none).
    fn follow(&mut self, data: &[u8]) -> usize {
        let (mut at, mut boundary) = (0, 0);
        while at < data.len() {
            if self.prefix_seen < 5 {
                let take = (5 - self.prefix_seen).min(data.len() - at);
                self.prefix[self.prefix_seen..self.prefix_seen + take]
                    .copy_from_slice(&data[at..at + take]);
                self.prefix_seen += take;
                at += take;
                if self.prefix_seen < 5 {
                    break;
                }
                self.remaining = u64::from(u32::from_be_bytes(
                    self.prefix[1..].try_into().expect("four bytes"),
                ));
            }
            let take = self.remaining.min((data.len() - at) as u64);
            self.remaining -= take;
            at += take as usize;
            if self.remaining == 0 {
                self.prefix_seen = 0;
                boundary = at;
            }
        }
        boundary
    }

    /// The current message's length with its prefix, once the prefix is known.
    fn current_len(&self) -> Option<u64> {
        (self.prefix_seen == 5).then(|| {
            5 + u64::from(u32::from_be_bytes(
                self.prefix[1..].try_into().expect("four bytes"),
            ))
        })
    }

    /// What of `data` goes to the caller now: whole messages, and the start of one too large to
    /// hold; the start of a smaller one waits in `held`.
    fn take(&mut self, data: Bytes) -> Option<Bytes> {
        let continued = self.sent_partly;
        let boundary = self.follow(&data);
        if self.prefix_seen == 0 || (continued && boundary == 0) {
            // Whole messages, or more of one already streaming on.
            self.sent_partly = self.prefix_seen != 0;
            return Some(self.with_held(data));
        }
        if self
            .current_len()
            .is_some_and(|len| len > GRPC_HELD_MESSAGE)
        {
            self.sent_partly = true;
            return Some(self.with_held(data));
        }
        self.sent_partly = false;
        if boundary == 0 {
            self.hold(&data);
            return None;
        }
        let whole = self.with_held(data.slice(..boundary));
        self.hold(&data[boundary..]);
        Some(whole)
    }

    /// Keeps `part` of the current message: room for the whole message is made once, when its
    /// length is known (not doubled frame after frame).
    fn hold(&mut self, part: &[u8]) {
        if let Some(len) = self.current_len() {
            self.held
                .reserve((len as usize).saturating_sub(self.held.len()));
        }
        self.held.extend_from_slice(part);
    }

    /// `data` after what is held, which goes with it; the buffer goes with them, so that a
    /// long stream keeps none between messages.
    fn with_held(&mut self, data: Bytes) -> Bytes {
        if self.held.is_empty() {
            return data;
        }
        self.held.extend_from_slice(&data);
        std::mem::take(&mut self.held).freeze()
    }
}

impl AnswerEnd {
    /// `inner` held to these ends; as it is when nothing needs watching (not gRPC, no deadline).
    pub fn wrap(inner: ProxyBody, deadline: Option<Instant>, grpc: bool) -> ProxyBody {
        if deadline.is_none() && !grpc {
            return inner;
        }
        AnswerEnd {
            inner: match deadline {
                Some(deadline) => Inner::timed(inner, deadline),
                None => Inner::Owned(inner),
            },
            messages: grpc.then(GrpcMessages::default),
            ended: false,
        }
        .boxed_unsync()
    }

    /// Ends the answer early: a gRPC one with `status` trailers between two messages (what is
    /// held of the next goes), or reset with CANCEL when a message already went in part (gRPC's
    /// protocol: a server ending a call inside a message; a client then says CANCELLED, where
    /// hyper's default INTERNAL_ERROR read as a server's bug); any other fails.
    fn end(&mut self, status: GrpcStatus, why: &str) -> Polled {
        self.ended = true;
        match &self.messages {
            Some(messages) if !messages.sent_partly => {
                Poll::Ready(Some(Ok(Frame::trailers(grpc_trailers(status, why)))))
            }
            Some(_) => Poll::Ready(Some(Err(Box::new(CutInsideMessage(why.to_string()))))),
            None => Poll::Ready(Some(Err(why.into()))),
        }
    }
}

/// A gRPC answer ended inside a message; its source is the reason hyper resets the stream with
/// (it looks for an `h2::Error` among an error's sources).
#[derive(Debug)]
struct CutInsideMessage(String);

static CANCEL: std::sync::LazyLock<h2::Error> =
    std::sync::LazyLock::new(|| h2::Error::from(h2::Reason::CANCEL));

impl std::fmt::Display for CutInsideMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CutInsideMessage {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*CANCEL)
    }
}

impl Body for AnswerEnd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(after) = self.messages.as_mut().and_then(|m| m.after_held.take()) {
            self.ended = after.is_none();
            return Poll::Ready(after.map(Ok));
        }
        loop {
            // The timer took the body: past the deadline.
            let Some(polled) = self.inner.poll_frame(cx) else {
                return self.end(
                    GrpcStatus::DeadlineExceeded,
                    "the route's timeout expired before the response's end",
                );
            };
            let Some(messages) = self.messages.as_mut() else {
                return polled;
            };
            let frame = match polled {
                Poll::Ready(Some(Err(e))) if !reset_by_backend(&*e) => {
                    let why =
                        format!("the backend's connection broke before the response's end: {e}");
                    return self.end(GrpcStatus::Unavailable, &why);
                }
                Poll::Ready(Some(Ok(frame))) => frame,
                other @ (Poll::Pending | Poll::Ready(Some(Err(_)))) => return other,
                Poll::Ready(None) if messages.held.is_empty() => return Poll::Ready(None),
                Poll::Ready(None) => {
                    messages.after_held = Some(None);
                    let held = std::mem::take(&mut messages.held).freeze();
                    return Poll::Ready(Some(Ok(Frame::data(held))));
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    if let Some(whole) = messages.take(data) {
                        return Poll::Ready(Some(Ok(Frame::data(whole))));
                    }
                    // All of it held: the next frame, or a wakeup for it.
                }
                Err(frame) if messages.held.is_empty() => return Poll::Ready(Some(Ok(frame))),
                Err(frame) => {
                    // The backend ended inside a message: its bytes go as they came.
                    messages.after_held = Some(Some(frame));
                    let held = std::mem::take(&mut messages.held).freeze();
                    return Poll::Ready(Some(Ok(Frame::data(held))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
            || (self.inner.read(Body::is_end_stream, false)
                && self
                    .messages
                    .as_ref()
                    .is_none_or(|m| m.held.is_empty() && m.after_held.is_none()))
    }

    fn size_hint(&self) -> SizeHint {
        if self.messages.is_some() {
            // Not exact: it may end early with trailers of its own (and hyper's server would
            // write an exact hint as the answer's length).
            return SizeHint::default();
        }
        self.inner.read(Body::size_hint, SizeHint::default())
    }
}

/// Trailers that end a gRPC answer with `status`, and `why` as its message.
fn grpc_trailers(status: GrpcStatus, why: &str) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(status.code()));
    if let Ok(message) = HeaderValue::from_str(&grpc_message(why)) {
        trailers.insert("grpc-message", message);
    }
    trailers
}

/// The backend reset the stream itself (RST_STREAM with a code of its choosing).
fn reset_by_backend(e: &(dyn std::error::Error + 'static)) -> bool {
    super::upstream::h2_error(e).is_some_and(|h2| h2.is_reset() && h2.is_remote())
}

/// The `grpc-status` of a gRPC answer's head (trailers-only) or trailers.
pub fn grpc_status(fields: &HeaderMap) -> Option<u32> {
    fields.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The gRPC status a client reports for an answer without one, by its HTTP status (gRPC's
/// doc/http-grpc-status-mapping.md: a proxy's or a plain HTTP backend's 503 is UNAVAILABLE,
/// not UNKNOWN); `None` for 200, whose trailers still say.
pub fn grpc_status_of_http(status: http::StatusCode) -> Option<u32> {
    Some(match status.as_u16() {
        200 => return None,
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    })
}

/// A gRPC answer's body that counts the `grpc-status` its trailers end the call with: ended
/// without one (or failed), UNKNOWN; dropped before its end (the caller went away), CANCELLED.
/// Its trailers get values of their own (`header_maps::own_values`): the caller's HPACK table
/// keeps what it indexes, and a `grpc-message` may differ per call.
pub struct CountGrpcStatus {
    inner: ProxyBody,
    /// Taken once the call's status is counted.
    counts: Option<Arc<GrpcCounts>>,
}

impl CountGrpcStatus {
    pub fn new(inner: ProxyBody, counts: Arc<GrpcCounts>) -> Self {
        CountGrpcStatus {
            inner,
            counts: Some(counts),
        }
    }

    fn count(&mut self, status: u32) {
        if let Some(counts) = self.counts.take() {
            counts.record(status);
        }
    }
}

impl Body for CountGrpcStatus {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &mut polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_mut() {
                    let status = grpc_status(trailers).unwrap_or(GrpcCounts::UNKNOWN);
                    self.count(status);
                    super::header_maps::own_values(trailers);
                }
            }
            Poll::Ready(Some(Err(_)) | None) => self.count(GrpcCounts::UNKNOWN),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CountGrpcStatus {
    /// Dropped before its end: the caller went away (CANCELLED). At its end without trailers
    /// (hyper's servers stop polling a body that says it ended, and never see its `None`): the
    /// backend ended the call without a status (UNKNOWN).
    fn drop(&mut self) {
        let status = if self.inner.is_end_stream() {
            GrpcCounts::UNKNOWN
        } else {
            1
        };
        self.count(status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer whose next frame is always ready (a backend faster than its caller) is still
    /// cut at its deadline. Before, the deadline was looked at only when no frame was ready:
    /// a download to a slow reader ran past the route's timeout for as long as it lasted. Its
    /// server yields between writes (tokio's budget on the caller's socket), as here.
    #[tokio::test]
    async fn an_answer_that_never_waits_is_still_cut_at_its_deadline() {
        // Whole gRPC messages, one a frame.
        let endless = || {
            let whole = Bytes::from(message(1, b'x'));
            http_body_util::StreamBody::new(futures::stream::repeat_with(move || {
                Ok::<_, BoxError>(Frame::data(whole.clone()))
            }))
            .boxed_unsync()
        };
        let past = Instant::now();
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        let mut plain = AnswerEnd::wrap(endless(), Some(past), false);
        assert!(
            plain.frame().await.unwrap().is_err(),
            "a plain answer fails"
        );
        let soon = Instant::now() + std::time::Duration::from_millis(20);
        let mut grpc = AnswerEnd::wrap(endless(), Some(soon), true);
        let started = Instant::now();
        let end = loop {
            let frame = grpc.frame().await.unwrap().unwrap();
            if frame.is_trailers() || started.elapsed() > std::time::Duration::from_secs(5) {
                break frame;
            }
            tokio::task::yield_now().await;
        };
        let trailers = end.into_trailers().expect("trailers end a gRPC answer");
        assert_eq!(trailers["grpc-status"], "4", "DEADLINE_EXCEEDED");
        assert!(grpc.frame().await.is_none());
    }

    /// A gRPC message: its prefix and `len` bytes of `fill`.
    fn message(len: usize, fill: u8) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(fill, len));
        m
    }

    /// These frames, then nothing ever again (a backend gone quiet).
    fn then_quiet(frames: Vec<Frame<Bytes>>) -> ProxyBody {
        use futures::StreamExt as _;
        let frames = futures::stream::iter(frames.into_iter().map(Ok::<_, BoxError>));
        http_body_util::StreamBody::new(frames.chain(futures::stream::pending())).boxed_unsync()
    }

    fn data(bytes: &[u8]) -> Frame<Bytes> {
        Frame::data(Bytes::copy_from_slice(bytes))
    }

    /// A caller's streaming body as hyper's server hands it on (over an in-memory connection),
    /// and the sender of its frames.
    async fn caller_stream() -> (
        Incoming,
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::convert::Infallible>>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (incoming_tx, incoming_rx) = tokio::sync::oneshot::channel();
        let incoming_tx = std::sync::Mutex::new(Some(incoming_tx));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                if let Some(tx) = incoming_tx.lock().unwrap().take() {
                    let _ = tx.send(request.into_body());
                }
                std::future::pending::<Result<http::Response<Empty<Bytes>>, std::convert::Infallible>>(
                )
            });
            let io = hyper_util::rt::TokioIo::new(server_io);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client_io))
                .await
                .unwrap();
        tokio::spawn(connection);
        let (frames, rx) = tokio::sync::mpsc::channel(16);
        let body = http_body_util::StreamBody::new(tokio_stream_of(rx));
        let request = http::Request::post("/").body(body).unwrap();
        tokio::spawn(async move { sender.send_request(request).await });
        (incoming_rx.await.unwrap(), frames)
    }

    fn tokio_stream_of<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    /// Once a request is answered, what was kept of its body for another attempt goes, and
    /// nothing more is kept: a gRPC stream (whose body is kept for a refused stream's resends)
    /// kept its first 64 KiB of messages for its life. A mirror waiting for the body keeps it.
    #[tokio::test]
    async fn an_answered_request_keeps_nothing_more_of_its_body() {
        let kept = |body: &RequestBody| match body {
            RequestBody::Recorded(r) => r.lock().kept.chunks.iter().map(Bytes::len).sum::<usize>(),
            _ => unreachable!("recorded"),
        };
        for mirrored in [false, true] {
            let (incoming, frames) = caller_stream().await;
            let mut body = RequestBody::new(CallerBody::Streaming(incoming), true, 64 * 1024);
            let mut mirror = mirrored.then(|| body.for_mirror());
            let mut attempt = body.next_attempt().expect("the first attempt's body");
            let mut read = 0;
            for sent in 1..=11 {
                frames
                    .send(Ok(Frame::data(Bytes::from_static(&[7; 1000]))))
                    .await
                    .unwrap();
                while read < sent * 1000 {
                    read += attempt
                        .frame()
                        .await
                        .unwrap()
                        .unwrap()
                        .into_data()
                        .unwrap()
                        .len();
                }
                if sent == 1 {
                    assert_eq!(kept(&body), 1000, "kept for another attempt");
                    body.answered();
                    // Sent already: it goes at once, the stream may stay quiet for hours.
                    let expected = if mirrored { 1000 } else { 0 };
                    assert_eq!(kept(&body), expected, "mirrored: {mirrored}");
                }
            }
            let expected = if mirrored { 11_000 } else { 0 };
            assert_eq!(kept(&body), expected, "mirrored: {mirrored}");
            if mirrored {
                // A mirror that gives up (its timeout) no longer holds it, from the next frame.
                mirror.take();
                frames
                    .send(Ok(Frame::data(Bytes::from_static(&[7; 1000]))))
                    .await
                    .unwrap();
                attempt.frame().await.unwrap().unwrap();
                assert_eq!(kept(&body), 0, "the mirror gave up");
            }
        }
    }

    /// An attempt made but not yet polled (a resend waiting for its stream's window) when the
    /// request is answered still sends what was kept: it was dropped as the last attempt's, sent
    /// already, and the resend lost the body's start.
    #[tokio::test]
    async fn a_resend_not_yet_polled_keeps_what_it_must_send() {
        let (incoming, frames) = caller_stream().await;
        let mut body = RequestBody::new(CallerBody::Streaming(incoming), true, 64 * 1024);
        let mut first = body.next_attempt().expect("the first attempt's body");
        frames
            .send(Ok(Frame::data(Bytes::from_static(b"one"))))
            .await
            .unwrap();
        assert_eq!(
            first.frame().await.unwrap().unwrap().into_data().unwrap(),
            "one"
        );
        let mut second = body.next_attempt().expect("a resend");
        body.answered();
        let frame = tokio::time::timeout(std::time::Duration::from_secs(5), second.frame())
            .await
            .expect("what was kept, at once");
        assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "one");
    }

    /// At the deadline the backend's side is let go (its connection or stream, its endpoint's
    /// count) whether or not the caller reads: a server polls no body while its caller's socket
    /// or window is full, and a caller that stopped reading held them for as long as it liked.
    #[tokio::test]
    async fn the_deadline_lets_the_backend_go_while_the_caller_reads_nothing() {
        struct Dropped(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let backend = then_quiet(vec![data(b"first")]);
        let held = Dropped(dropped.clone());
        let backend = backend
            .map_frame(move |frame| {
                let _held = &held;
                frame
            })
            .boxed_unsync();
        let deadline = Instant::now() + std::time::Duration::from_millis(50);
        let mut answer = AnswerEnd::wrap(backend, Some(deadline), false);
        assert_eq!(
            answer.frame().await.unwrap().unwrap().into_data().unwrap(),
            "first"
        );
        // The caller reads nothing more for a while.
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        assert!(
            dropped.load(std::sync::atomic::Ordering::Relaxed),
            "let go at the deadline, unpolled"
        );
        assert!(answer.frame().await.unwrap().is_err(), "then cut short");
    }

    /// The agent's own trailers fall between whole messages: a message begun when the deadline
    /// passes is held back, not cut (a client reading it cut short reports INTERNAL and never
    /// reads the trailers' DEADLINE_EXCEEDED).
    #[tokio::test]
    async fn a_grpc_deadline_ends_the_answer_between_whole_messages() {
        let whole = message(3, b'a');
        let begun = message(10, b'b');
        let mut first = whole.clone();
        first.extend_from_slice(&begun[..9]);
        let deadline = Instant::now() + std::time::Duration::from_millis(50);
        let mut answer = AnswerEnd::wrap(then_quiet(vec![data(&first)]), Some(deadline), true);
        let sent = answer.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(sent, whole, "the whole message, not the begun one");
        let end = answer.frame().await.unwrap().unwrap();
        assert_eq!(end.into_trailers().unwrap()["grpc-status"], "4");
        assert!(answer.frame().await.is_none());
    }

    /// A message larger than the hold streams on as it comes; cut in its middle, the answer
    /// fails (the caller's stream is reset) rather than end with trailers no client reads.
    #[tokio::test]
    async fn a_grpc_message_too_large_to_hold_streams_on_and_a_cut_resets() {
        let large = message(GRPC_HELD_MESSAGE as usize, b'l');
        let deadline = Instant::now() + std::time::Duration::from_millis(50);
        let frames = vec![data(&large[..1000]), data(&large[1000..2000])];
        let mut answer = AnswerEnd::wrap(then_quiet(frames), Some(deadline), true);
        for part in [&large[..1000], &large[1000..2000]] {
            let sent = answer.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(sent, part);
        }
        let cut = answer
            .frame()
            .await
            .unwrap()
            .expect_err("reset, not trailers");
        let reason = super::super::upstream::h2_error(&*cut).and_then(h2::Error::reason);
        assert_eq!(reason, Some(h2::Reason::CANCEL), "{cut}");
    }

    /// Messages across frames go whole, in order, and the backend's trailers follow; a message
    /// the backend itself ends inside goes as it came, before its trailers.
    #[tokio::test]
    async fn grpc_messages_across_frames_go_whole_and_a_backends_own_cut_passes() {
        let (a, b) = (message(20, b'a'), message(7, b'b'));
        let mut stream = a.clone();
        stream.extend_from_slice(&b);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames = vec![
            data(&stream[..2]),
            data(&stream[2..12]),
            data(&stream[12..30]),
            data(&stream[30..]),
            Frame::trailers(trailers.clone()),
        ];
        let mut answer = AnswerEnd::wrap(then_quiet(frames), None, true);
        let mut sent = Vec::new();
        while let Some(frame) = answer.frame().await {
            match frame.unwrap().into_data() {
                Ok(data) => sent.push(data),
                Err(end) => {
                    assert_eq!(end.into_trailers().unwrap(), trailers);
                    break;
                }
            }
        }
        assert_eq!(sent, [&a[..], &b[..]], "each message whole");

        let mut messages = GrpcMessages::default();
        let large = message(GRPC_HELD_MESSAGE as usize - 5, b'l');
        let (head, tail) = large.split_at(16 * 1024);
        assert!(
            messages.take(Bytes::copy_from_slice(head)).is_none(),
            "held"
        );
        assert_eq!(messages.held.capacity(), large.len(), "room made once");
        let whole = messages.take(Bytes::copy_from_slice(tail)).unwrap();
        assert_eq!(whole, large);
        assert_eq!(
            messages.held.capacity(),
            0,
            "no buffer kept between messages"
        );

        let cut = vec![data(&b[..4]), Frame::trailers(trailers.clone())];
        let mut answer = AnswerEnd::wrap(then_quiet(cut), None, true);
        let sent = answer.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(sent, b[..4], "the backend's own bytes");
        let end = answer.frame().await.unwrap().unwrap();
        assert_eq!(end.into_trailers().unwrap(), trailers);
    }

    /// A gRPC answer's trailers count its status, and hold nothing of the buffer they were read
    /// into (a `grpc-message` would stay in an HTTP/2 caller's HPACK table with it).
    #[tokio::test]
    async fn a_grpc_answers_trailers_count_and_own_their_values() {
        let read = Bytes::copy_from_slice(b"5not found: user 1234");
        let mut trailers = HeaderMap::new();
        let value = |range| http::HeaderValue::from_maybe_shared(read.slice(range)).unwrap();
        trailers.insert("grpc-status", value(0..1));
        trailers.insert("grpc-message", value(1..21));
        let counts = Arc::new(GrpcCounts::default());
        let frames = vec![data(b"x"), Frame::trailers(trailers)];
        let mut counting = CountGrpcStatus::new(then_quiet(frames), counts.clone());
        counting.frame().await.unwrap().unwrap();
        let end = counting
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(end["grpc-message"], "not found: user 1234");
        assert_eq!(counts.read(), [(5, 1)]);
        assert!(read.is_unique(), "a trailer value holds the buffer read");
    }

    /// A gRPC answer that ends without trailers counts UNKNOWN even when its server never polls
    /// past its end (hyper's stop at `is_end_stream`); dropped before its end, CANCELLED.
    #[tokio::test]
    async fn a_grpc_answer_ended_without_trailers_counts_unknown() {
        let counted = |body: ProxyBody, frames: usize| async move {
            let counts = Arc::new(GrpcCounts::default());
            let mut counting = CountGrpcStatus::new(body, counts.clone());
            for _ in 0..frames {
                counting.frame().await;
            }
            drop(counting);
            counts.read()
        };
        let unknown = GrpcCounts::UNKNOWN;
        assert_eq!(
            counted(full("x"), 1).await,
            [(unknown, 1)],
            "its last frame read"
        );
        assert_eq!(counted(empty(), 0).await, [(unknown, 1)], "a bodiless head");
        let endless = http_body_util::StreamBody::new(futures::stream::pending::<
            Result<Frame<Bytes>, BoxError>,
        >())
        .boxed_unsync();
        assert_eq!(counted(endless, 0).await, [(1, 1)], "cancelled");
    }
}
