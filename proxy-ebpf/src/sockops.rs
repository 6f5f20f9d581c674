//! `sockops`: when a redirected connection is established, publish its record under the caller's
//! local ip:port and the agent's listener port, what the agent knows of a connection it accepts;
//! and pair the sockets of node-local connections through the agent (`local`).
//!
//! The kernel runs ACTIVE_ESTABLISHED on the caller's side when the SYN-ACK arrives, before the final
//! ACK is sent, so the record is in `CALLERS` before the agent can `accept()` the connection. The
//! agent takes it when it accepts; one it never takes (the caller reset first, or gave up in a
//! full accept queue) goes when the caller's socket closes abortively, so that a later connection
//! from the same address made straight to the agent's port finds no identity to borrow.

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, BPF_TCP_ESTABLISHED, BPF_TCP_FIN_WAIT1,
    },
    helpers::{bpf_get_socket_cookie, bpf_sk_storage_get, bpf_sock_ops_cb_flags_set},
    macros::sock_ops,
    programs::SockOpsContext,
};
use proxy_common::{counters, CallerKey, Endpoint, RedirectRecord};

use crate::{
    ctx_access, local,
    maps::{count, map_ptr, AGENT_DIALS, CALLERS, REDIRECTED},
    AF_INET,
};

#[sock_ops]
pub fn gamma_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let caller = publish_caller(&ctx);
            // A caller joins if its pod opted in: it reads what the agent sends it.
            let joins = || match caller {
                Some(caller) => local::pod_opted_in(&caller),
                None => dialled_by_agent(&ctx),
            };
            if local::enabled() && joins() {
                local::join_active(&ctx);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB if local::enabled() => local::join_passive(&ctx),
        // Only for sockets `local::join` asked it for.
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => local::sent_over_tcp(&ctx),
        // Only for callers' sockets `publish_caller` asked it for.
        BPF_SOCK_OPS_STATE_CB if closed_abortively(ctx.arg(0), ctx.arg(1)) => forget_caller(&ctx),
        _ => {}
    }
    crate::ALLOW as u32
}

/// Whether the socket is one the agent dialled (marked at connect(): `connect::mark_agent`).
#[inline(always)]
fn dialled_by_agent(ctx: &SockOpsContext) -> bool {
    // SAFETY: `sk` is null or a full socket (checked); the storage is only tested for presence.
    unsafe {
        let sk = (*ctx.ops).__bindgen_anon_2.sk;
        !sk.is_null()
            && !bpf_sk_storage_get(map_ptr(&AGENT_DIALS), sk.cast(), core::ptr::null_mut(), 0)
                .is_null()
    }
}

/// Publishes the record of a redirected connection; the caller's address if the socket is one.
#[inline(always)]
fn publish_caller(ctx: &SockOpsContext) -> Option<Endpoint> {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: `sk` is null or a full socket (the verifier enforces the check); the storage pointer
    // is checked for null before use.
    let record = unsafe {
        let sk = (*ops).__bindgen_anon_2.sk;
        if sk.is_null() {
            return None;
        }
        bpf_sk_storage_get(map_ptr(&REDIRECTED), sk.cast(), core::ptr::null_mut(), 0)
            .cast::<RedirectRecord>()
    };
    if record.is_null() {
        return None; // not a redirected connection
    }
    // SAFETY: `record` points to this socket's storage, valid for the program's run.
    let record = unsafe { *record };
    let (caller, agent_port) = caller_and_agent_port(ctx);
    // A failed insert only costs the agent the original destination of this connection; nothing to
    // undo here but counting it.
    if CALLERS
        .insert(CallerKey::new(caller, agent_port), record, 0)
        .is_err()
    {
        count(counters::RECORD_FAILED);
        return Some(caller);
    }
    // SAFETY: a context field read at its own offset; the helper takes the context.
    unsafe {
        let flags = ctx_access::read_u32(&raw const (*ops).bpf_sock_ops_cb_flags);
        bpf_sock_ops_cb_flags_set(ops, (flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
    Some(caller)
}

/// Whether a socket closed before its FIN was acknowledged (a reset, sent or received; a
/// timeout): the agent may never accept such a connection. After an orderly close (from
/// FIN_WAIT2, CLOSING or LAST_ACK: its FIN acknowledged) the agent's side exists, waiting to be
/// accepted, and takes the record: a caller that writes and closes before the agent accepts
/// keeps it. (One that aborts in FIN_WAIT1 after its FIN reached the agent, not yet
/// acknowledged, loses its request: the states cannot tell that apart.)
#[inline(always)]
fn closed_abortively(old_state: u32, new_state: u32) -> bool {
    new_state == BPF_TCP_CLOSE
        && (old_state == BPF_TCP_ESTABLISHED || old_state == BPF_TCP_FIN_WAIT1)
}

/// A caller's socket closed abortively: its record goes, if the agent has not taken it and it is
/// this socket's (the socket may have connected again since, from the address of another's).
#[inline(always)]
fn forget_caller(ctx: &SockOpsContext) {
    let (caller, agent_port) = caller_and_agent_port(ctx);
    let key = CallerKey::new(caller, agent_port);
    // SAFETY: the helper takes the program's context; the map value is read while the program
    // runs.
    let ours = unsafe {
        let cookie = bpf_get_socket_cookie(ctx.ops.cast());
        CALLERS
            .get(&key)
            .is_some_and(|record| record.socket_cookie == cookie)
    };
    if ours {
        let _ = CALLERS.remove(&key);
    }
}

/// What keys a caller's record: the caller's address and the agent port it reached.
#[inline(always)]
fn caller_and_agent_port(ctx: &SockOpsContext) -> (Endpoint, u16) {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: context fields read at their own offsets.
    unsafe {
        // sock_ops gives local_port in host byte order (unlike every address field), and
        // remote_port in network byte order as a 32-bit word (the port in its high half on a
        // little-endian machine).
        let port = (ctx_access::read_u32(&raw const (*ops).local_port) as u16).to_be();
        let agent_port =
            (u32::from_be(ctx_access::read_u32(&raw const (*ops).remote_port)) as u16).to_be();
        // Both address fields are read unconditionally: reads in the two branches get merged by
        // LLVM into one read from a selected offset, which the verifier rejects.
        let ip4 = ctx_access::read_u32(&raw const (*ops).local_ip4);
        let ip6 = ctx_access::read_ip6(&raw const (*ops).local_ip6);
        let caller = if ctx_access::read_u32(&raw const (*ops).family) == AF_INET {
            Endpoint::v4(ip4, port)
        } else {
            // Dual-stack sockets dialling IPv4 have a v4-mapped local address: same key as AF_INET.
            Endpoint::v6(ip6, port)
        };
        (caller, agent_port)
    }
}
