//! Node-local connections through the agent move their bytes socket to socket: what one socket of
//! a pair sends goes straight into its peer's receive queue (`sk_msg` redirect), skipping the
//! TCP/IP stack, the loopback or veth device, the softirq and the ACKs. On only when the agent says
//! so (`AgentConfig::local_sockets`).
//!
//! Who joins `LOCAL_SOCKETS` (in `sockops`, see [`join_active`] and [`join_passive`]): the two
//! ends of a caller's connection to the agent, and of the agent's connection to a backend on this
//! node, when that pod opted in (its address in `LOCAL_PODS`, told by the agent: the pod reads
//! without splice(2) and keeps up, as moved bytes need). The active end joins when established and
//! leaves its pair in `LOCAL_PENDING`; the passive end, established a moment later on the same
//! node, finds it there and joins too. The agent's dials are marked at connect(): only the agent's
//! sockets and the sockets talking to it are ever touched.
//!
//! Order: a socket's bytes must not overtake each other. A redirected send lands in the peer's
//! socket queue, which the peer reads before its TCP queue; a socket that sent over TCP while its
//! peer was not paired yet could see later, redirected bytes read first. So each socket decides
//! once, at its first send ([`gamma_local_msg`]): peer paired, all its bytes move; otherwise all
//! take the TCP path. A write that began before the socket joined (TCP Fast Open, or a send
//! waiting for connect() in another thread) goes out over TCP without that program: the first
//! data segment such a socket transmits decides TCP too ([`sent_over_tcp`]).

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, sk_action::SK_PASS, sk_msg_md, BPF_F_INGRESS, BPF_SK_STORAGE_GET_F_CREATE,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::{bpf_sk_storage_get, bpf_sock_ops_cb_flags_set},
    macros::sk_msg,
    programs::{SkMsgContext, SockOpsContext},
};
use proxy_common::{counters, Endpoint, PodKey, SocketPair, ANY_POD_OPTED_IN};

use crate::{
    ctx_access,
    maps::{count, map_ptr, CONFIG, LOCAL_PENDING, LOCAL_PODS, LOCAL_SEND, LOCAL_SOCKETS},
    AF_INET,
};

/// `LOCAL_SEND` values: a joined socket's sends not decided yet, moved to the peer, or left to TCP.
const SEND_UNDECIDED: u32 = 0;
const SEND_MOVE: u32 = 1;
const SEND_TCP: u32 = 2;

/// Both ends of the connection, read from a `bpf_sock_ops` or `sk_msg_md` context (same field
/// names): `local_port` is in host byte order there, `remote_port` in network order in the upper
/// half of the word. A v4-mapped IPv6 socket yields the same key as an IPv4 one.
macro_rules! socket_pair {
    ($ctx:expr) => {{
        let ctx = $ctx;
        let local_port = (ctx_access::read_u32(&raw const (*ctx).local_port) as u16).to_be();
        let remote_port = (ctx_access::read_u32(&raw const (*ctx).remote_port) >> 16) as u16;
        // Every field read unconditionally: see `sockops::publish_caller`.
        let local4 = ctx_access::read_u32(&raw const (*ctx).local_ip4);
        let remote4 = ctx_access::read_u32(&raw const (*ctx).remote_ip4);
        let local6 = ctx_access::read_ip6(&raw const (*ctx).local_ip6);
        let remote6 = ctx_access::read_ip6(&raw const (*ctx).remote_ip6);
        if ctx_access::read_u32(&raw const (*ctx).family) == AF_INET {
            SocketPair {
                local: Endpoint::v4(local4, local_port),
                remote: Endpoint::v4(remote4, remote_port),
            }
        } else {
            SocketPair {
                local: Endpoint::v6(local6, local_port),
                remote: Endpoint::v6(remote6, remote_port),
            }
        }
    }};
}

/// Whether the address is one of this node's pods that opted in (`LOCAL_PODS`, told by the agent).
#[inline(always)]
pub(crate) fn pod_opted_in(address: &Endpoint) -> bool {
    LOCAL_PODS.get_ptr(PodKey { ip: address.ip }).is_some()
}

/// Whether any pod of this node opted in (`ANY_POD_OPTED_IN`, kept by the agent with the set).
#[inline(always)]
pub(crate) fn any_pod_opted_in() -> bool {
    LOCAL_PODS.get_ptr(ANY_POD_OPTED_IN).is_some()
}

/// Whether the agent asked for local sockets.
#[inline(always)]
pub(crate) fn enabled() -> bool {
    CONFIG.get(0).is_some_and(|c| c.local_sockets != 0)
}

/// An active end that is the agent's or a caller's to the agent (the caller checks that) joins, and
/// waits in `LOCAL_PENDING` for its passive end.
#[inline(always)]
pub(crate) fn join_active(ctx: &SockOpsContext) {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: context fields read at their own offsets.
    let pair = unsafe { socket_pair!(ops) };
    if join(ops, pair) {
        // Lost (evicted or not stored): the passive end stays out, and this end's first send
        // finds no peer and keeps TCP.
        let _ = LOCAL_PENDING.insert(pair, 1, 0);
    }
}

/// A passive end joins if its active end waits for it.
#[inline(always)]
pub(crate) fn join_passive(ctx: &SockOpsContext) {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: context fields read at their own offsets.
    let pair = unsafe { socket_pair!(ops) };
    if LOCAL_PENDING.remove(pair.peer()).is_ok() && join(ops, pair) {
        count(counters::LOCAL_PAIRED);
    }
}

/// Puts the context's socket in `LOCAL_SOCKETS` under `pair`, its sends undecided. The decision is
/// (re)set here, before the socket can send on this connection: a socket that connects again
/// must not keep the last connection's. Without a place for it, the socket stays out (and its
/// sends never move).
#[inline(always)]
fn join(ops: *mut bpf_sock_ops, pair: SocketPair) -> bool {
    let state = send_state(ops, BPF_SK_STORAGE_GET_F_CREATE.into());
    if state.is_null() {
        return false;
    }
    // SAFETY: `state` is this socket's storage, valid for the program's run; at the ESTABLISHED
    // callbacks the context holds a full socket.
    unsafe {
        *state = SEND_UNDECIDED;
        if LOCAL_SOCKETS.update(pair, &mut *ops, 0).is_err() {
            return false;
        }
    }
    // Until its sends are decided, each segment it transmits is seen (`sent_over_tcp`).
    watch_segments(ops, true);
    true
}

/// The context socket's `LOCAL_SEND` state (created with `flags` = F_CREATE), or null: no full
/// socket, or no storage.
#[inline(always)]
fn send_state(ops: *mut bpf_sock_ops, flags: u64) -> *mut u32 {
    // SAFETY: `sk` is null or a full socket (checked before use).
    unsafe {
        let sk = (*ops).__bindgen_anon_2.sk;
        if sk.is_null() {
            return core::ptr::null_mut();
        }
        bpf_sk_storage_get(
            map_ptr(&LOCAL_SEND),
            sk.cast(),
            core::ptr::null_mut(),
            flags,
        )
        .cast::<u32>()
    }
}

/// Asks for (or stops) the header-option callback on each segment the socket sends.
#[inline(always)]
fn watch_segments(ops: *mut bpf_sock_ops, on: bool) {
    // SAFETY: a context field read at its own offset; the helper takes the context.
    unsafe {
        let flags = ctx_access::read_u32(&raw const (*ops).bpf_sock_ops_cb_flags);
        let flags = if on {
            flags | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG
        } else {
            flags & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG
        };
        bpf_sock_ops_cb_flags_set(ops, flags as i32);
    }
}

/// A segment of a joined socket is about to be sent over TCP: if it carries data while the socket's
/// sends are undecided, they are decided for TCP (that data went without `gamma_local_msg`). Once
/// decided, the socket's segments need not be seen any more.
#[inline(always)]
pub(crate) fn sent_over_tcp(ctx: &SockOpsContext) {
    let ops: *mut bpf_sock_ops = ctx.ops;
    let state = send_state(ops, 0);
    if state.is_null() {
        return;
    }
    // SAFETY: `state` is this socket's storage, valid for the program's run; a context field read
    // at its own offset.
    unsafe {
        if *state == SEND_UNDECIDED {
            if ctx_access::read_u32(&raw const (*ops).skb_len) == 0 {
                return; // an ACK or a FIN: no data yet
            }
            *state = SEND_TCP;
            count(counters::LOCAL_KEPT_TCP);
        }
    }
    watch_segments(ops, false);
}

/// Runs on every send of a socket in `LOCAL_SOCKETS`: moves the bytes into the peer's receive queue
/// when this socket's first send found the peer paired, else lets them take the TCP path.
#[sk_msg]
pub fn gamma_local_msg(ctx: SkMsgContext) -> u32 {
    let md: *mut sk_msg_md = ctx.msg;
    // SAFETY: `sk` is the sending socket (never null for sk_msg); looked up, not created: a socket
    // joins with its state (`join`), so one without has not joined properly and keeps TCP.
    let state = unsafe {
        bpf_sk_storage_get(
            map_ptr(&LOCAL_SEND),
            (*md).__bindgen_anon_3.sk.cast(),
            core::ptr::null_mut(),
            0,
        )
        .cast::<u32>()
    };
    // SAFETY: `state` is null or this socket's storage, valid for the program's run; context
    // fields are read at their own offsets.
    unsafe {
        if state.is_null() || *state == SEND_TCP {
            return SK_PASS;
        }
        let peer = socket_pair!(md).peer();
        // SK_PASS with the redirect set moves the bytes; without it (no peer: not paired, or
        // closed since), they take the TCP path.
        let moved = LOCAL_SOCKETS.redirect_msg(&ctx, peer, BPF_F_INGRESS.into()) == SK_PASS.into();
        if *state == SEND_UNDECIDED {
            *state = if moved { SEND_MOVE } else { SEND_TCP };
            count(if moved {
                counters::LOCAL_MOVED
            } else {
                counters::LOCAL_KEPT_TCP
            });
        }
    }
    SK_PASS
}
