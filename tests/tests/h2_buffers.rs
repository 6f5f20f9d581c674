//! The agent's HTTP/2 library is h2 with a patch (`vendor/h2/PATCH.md`): a connection holds its
//! frame buffers (write 16 KiB, read 8 KiB, Huffman 4 KiB) only while it uses them, and a thread
//! keeps those given back for the next use. These tests hold h2 to both halves, counting the heap
//! of this test binary: idle connections hold none of those buffers, and a busy connection takes
//! them from the thread's spares instead of allocating them per request. Unpatched h2 fails the
//! first (each idle connection, client and server side, holds 28 KiB of them).

use bytes::Bytes;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use tokio::net::{TcpListener, TcpStream};

/// Live heap bytes, live allocations of a frame buffer's size (16 KiB write, 8 KiB read, 4 KiB
/// Huffman), and allocations of 4 KiB or more.
static LIVE: AtomicIsize = AtomicIsize::new(0);
static LIVE_BUFFERS: AtomicIsize = AtomicIsize::new(0);
static LARGE: AtomicUsize = AtomicUsize::new(0);
const LARGE_SIZE: usize = 4 * 1024;
const BUFFER_SIZES: [usize; 3] = [4 * 1024, 8 * 1024, 16 * 1024];

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted(layout.size());
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        freed(layout.size());
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        freed(layout.size());
        counted(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

fn counted(size: usize) {
    LIVE.fetch_add(size as isize, Ordering::Relaxed);
    if BUFFER_SIZES.contains(&size) {
        LIVE_BUFFERS.fetch_add(1, Ordering::Relaxed);
    }
    if size >= LARGE_SIZE {
        LARGE.fetch_add(1, Ordering::Relaxed);
    }
}

fn freed(size: usize) {
    LIVE.fetch_sub(size as isize, Ordering::Relaxed);
    if BUFFER_SIZES.contains(&size) {
        LIVE_BUFFERS.fetch_sub(1, Ordering::Relaxed);
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// The counters are the process's: one test at a time (nextest runs each in its own anyway).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An h2 server on 127.0.0.1 answering every request with a short body, as a backend would.
async fn server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut connection = h2::server::handshake(socket).await.unwrap();
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    drop(request);
                    let answer = http::Response::builder().status(200).body(()).unwrap();
                    let mut body = respond.send_response(answer, false).unwrap();
                    body.send_data(Bytes::from_static(b"hello"), true).unwrap();
                }
            });
        }
    });
    addr
}

/// A client connection to `addr`, its driver spawned.
async fn client(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
    let socket = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(socket).await.unwrap();
    tokio::spawn(async move { connection.await.unwrap() });
    send
}

/// One GET with the header fields a real client sends (Huffman-coded and indexed by h2's
/// encoder), its answer read to the end.
async fn round_trip(send: &mut h2::client::SendRequest<Bytes>, n: usize) {
    let request = http::Request::get(format!("http://front.example/items/{n}"))
        .header("user-agent", "gamma-tests/1.0")
        .header("accept", "application/json")
        .body(())
        .unwrap();
    *send = send.clone().ready().await.unwrap();
    let (answer, _) = send.send_request(request, true).unwrap();
    let mut body = answer.await.unwrap().into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
}

/// Lets every connection's task run until it waits on its socket again.
async fn settle() {
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "current_thread")]
async fn idle_http2_connections_hold_no_frame_buffers() {
    const CONNECTIONS: usize = 64;
    let _alone = ONE_AT_A_TIME.lock().await;
    let addr = server().await;
    // A first connection fills this thread's spares, as a worker's would be.
    let mut first = client(addr).await;
    round_trip(&mut first, 0).await;
    settle().await;
    let before = LIVE.load(Ordering::Relaxed);
    let buffers_before = LIVE_BUFFERS.load(Ordering::Relaxed);
    let mut held = Vec::new();
    for n in 0..CONNECTIONS {
        let mut send = client(addr).await;
        round_trip(&mut send, n).await;
        held.push(send);
    }
    settle().await;
    // No connection holds one: all given back, a few kept by this thread (the spares). Unpatched,
    // three per end of each; without the HPACK table's copies, the indexed `:authority` keeps
    // the server end's Huffman buffer (h2's encoder codes every string).
    let buffers = LIVE_BUFFERS.load(Ordering::Relaxed) - buffers_before;
    assert!(
        buffers <= 8,
        "{buffers} more frame buffers live with {CONNECTIONS} idle HTTP/2 connections: idle \
         connections hold them (is vendor/h2's patch in use?)"
    );
    let each = (LIVE.load(Ordering::Relaxed) - before) / CONNECTIONS as isize;
    // Both ends of each connection, their tasks and sockets' registrations, and the client's
    // request handles: 15.3 KB with the patch, 71.9 KB without (2026-12-07).
    assert!(
        each < 20 * 1024,
        "each idle HTTP/2 connection (both ends) holds {each} bytes: h2's frame buffers are \
         kept while idle (is vendor/h2's patch in use?)"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_busy_http2_connection_takes_its_frame_buffers_from_the_spares() {
    const REQUESTS: usize = 200;
    let _alone = ONE_AT_A_TIME.lock().await;
    let addr = server().await;
    let mut send = client(addr).await;
    for n in 0..10 {
        round_trip(&mut send, n).await;
    }
    settle().await;
    let large = LARGE.load(Ordering::Relaxed);
    for n in 0..REQUESTS {
        round_trip(&mut send, n).await;
    }
    let allocated = LARGE.load(Ordering::Relaxed) - large;
    // Each request takes and gives back up to three buffers on each end. A version that freed a
    // buffer given back while still shared (the last DATA payload not yet read) allocated the
    // client's read buffer anew for each request: 200 here.
    assert!(
        allocated < REQUESTS / 10,
        "{allocated} allocations of {LARGE_SIZE} bytes or more in {REQUESTS} requests: frame \
         buffers given back are not reused"
    );
}
