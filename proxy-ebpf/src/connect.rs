//! `cgroup/connect4` and `cgroup/connect6`: send a mesh Service's connections to the agent.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_map_lookup_elem, bpf_sk_release,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext as _,
};
use proxy_common::{
    counters, AgentConfig, Endpoint, RedirectRecord, ServiceKey, LISTENER_CLIENT_FIRST_V4,
    LISTENER_CLIENT_FIRST_V6, LISTENER_V4, LISTENER_V6, STEER_CLIENT_FIRST,
};

use crate::{
    ctx_access, local,
    maps::{count, map_ptr, AGENT_DIALS, AGENT_LISTENERS, CONFIG, MESH_SERVICES, REDIRECTED},
    ALLOW,
};

const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn gamma_connect4(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the kernel passes a valid context; fields are read and written as whole u32s, the
    // access size the verifier allows for them.
    unsafe {
        if (*sa).protocol != IPPROTO_TCP {
            return ALLOW;
        }
        let dst = Endpoint::v4((*sa).user_ip4, (*sa).user_port as u16);
        match steer(&ctx, dst, true) {
            Some(agent) => {
                (*sa).user_ip4 = agent.ip4();
                (*sa).user_port = u32::from(agent.port);
            }
            None => {
                forget(&ctx);
                mark_agent(&ctx, &dst);
            }
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn gamma_connect6(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as in connect4.
    unsafe {
        if (*sa).protocol != IPPROTO_TCP {
            return ALLOW;
        }
        let dst = Endpoint::v6(
            ctx_access::read_ip6(&raw const (*sa).user_ip6),
            (*sa).user_port as u16,
        );
        // A dual-stack socket dialling an IPv4 VIP passes it v4-mapped (the kernel does not run
        // connect4 for it): the key is the same as connect4's, and the agent's IPv4 address, also
        // v4-mapped, is what such a socket can reach.
        match steer(&ctx, dst, dst.is_v4()) {
            Some(agent) => {
                ctx_access::write_ip6(&raw mut (*sa).user_ip6, agent.ip);
                (*sa).user_port = u32::from(agent.port);
            }
            None => {
                forget(&ctx);
                mark_agent(&ctx, &dst);
            }
        }
    }
    ALLOW
}

/// Where to send a connect() to `dst` (`v4`: an IPv4 destination), if anywhere; records the
/// original destination on the socket when it answers `Some`. `None` (leave the connection alone)
/// unless all of: `dst` is a mesh Service, the agent has an address and a live listener for this
/// family, the caller is not the agent, and the record could be stored (a redirect without a
/// record would lose the destination).
#[inline(always)]
fn steer(ctx: &SockAddrContext, dst: Endpoint, v4: bool) -> Option<Endpoint> {
    // Most connects are not to mesh Services: the hash lookup comes first.
    // SAFETY: the value is copied out at once.
    let steering = unsafe { *MESH_SERVICES.get(ServiceKey { vip: dst })? };
    let config = CONFIG.get(0)?;
    let (listen, slot) = agent_listener(config, v4, false);
    if !listen.is_set() {
        return None;
    }
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if cgroup_id == config.agent_cgroup_id {
        return None;
    }
    let client_first = client_first_listener(config, v4, steering);
    let agent = match client_first {
        Some(agent) => agent,
        None if listener_alive(slot) => listen,
        None => {
            count(counters::AGENT_GONE);
            #[cfg(feature = "log")]
            aya_log_ebpf::info!(
                ctx,
                "mesh Service port {}: the agent is gone, fail open",
                u16::from_be(dst.port)
            );
            return None;
        }
    };
    // SAFETY: the context's socket is a full socket; the storage pointer is checked for null.
    let record = unsafe { REDIRECTED.get_or_insert_ptr_mut(ctx, None) };
    if record.is_null() {
        count(counters::RECORD_FAILED);
        #[cfg(feature = "log")]
        aya_log_ebpf::warn!(
            ctx,
            "mesh Service port {}: no socket storage for the record, not steered",
            u16::from_be(dst.port)
        );
        return None;
    }
    // SAFETY: the helpers take the program's context; `record` is a valid map value.
    unsafe {
        *record = RedirectRecord {
            netns_cookie: bpf_get_netns_cookie(ctx.as_ptr()),
            cgroup_id,
            socket_cookie: bpf_get_socket_cookie(ctx.as_ptr()),
            original_dst: dst,
            _pad: 0,
        };
    }
    count(counters::STEERED);
    if client_first.is_some() {
        count(counters::STEERED_CLIENT_FIRST);
    }
    #[cfg(feature = "log")]
    aya_log_ebpf::debug!(
        ctx,
        "steered a connect to mesh Service port {} (cgroup {})",
        u16::from_be(dst.port),
        cgroup_id
    );
    Some(agent)
}

/// Drops the record of an earlier redirected connect() on this socket, if any: a TCP socket may
/// connect() again after a failed attempt, and getpeername must not report the old VIP then.
/// Sockets without storage (nearly all) return at the first check inside the helper.
#[inline(always)]
fn forget(ctx: &SockAddrContext) {
    // SAFETY: the context's socket pointer is valid for the program's run.
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        let _ = REDIRECTED.delete(sk);
    }
}

/// Marks the agent's own connections to this node's pods that opted in (backends, mostly) when
/// local sockets are on: their sockets join `LOCAL_SOCKETS` once established (`sockops`) and pair
/// with the backend's.
/// Connections to other nodes are left alone: joined, they would never pair, yet would hold slots of
/// `LOCAL_SOCKETS` and `LOCAL_PENDING` (an LRU: they would evict pending ends that can pair) and
/// take the sockmap's detour at every send and receive.
#[inline(always)]
fn mark_agent(ctx: &SockAddrContext, dst: &Endpoint) {
    let Some(config) = CONFIG.get(0) else { return };
    // SAFETY: helper without arguments.
    if config.local_sockets == 0 || unsafe { bpf_get_current_cgroup_id() } != config.agent_cgroup_id
    {
        return;
    }
    if !local::pod_opted_in(dst) {
        // A socket connect()ed again after a failed attempt keeps no mark made for a pod it
        // dialled before. SAFETY: the context's socket pointer is valid for the program's run.
        let _ = unsafe { AGENT_DIALS.delete((*ctx.sock_addr).__bindgen_anon_1.sk) };
        return;
    }
    // SAFETY: the context's socket is a full socket; a storage that cannot be created leaves the
    // connection on the TCP path.
    let _ = unsafe { AGENT_DIALS.get_or_insert_ptr_mut(ctx, None) };
}

/// The agent's listener for ports whose clients speak first, for a port `steering` says is one,
/// if the agent has one for the family and it is open: it hands a connection on only with its
/// first bytes. `None`: the family's other listener takes it, as it does while pods of the node
/// opted in to local sockets (`proxy_common::ANY_POD_OPTED_IN`).
#[inline(always)]
fn client_first_listener(config: &AgentConfig, v4: bool, steering: u8) -> Option<Endpoint> {
    // Pods that may pair their sockets with the agent's (which one dials is not known yet);
    // looked up only for a port that would go there.
    let may_pair = || config.local_sockets != 0 && local::any_pod_opted_in();
    if steering != STEER_CLIENT_FIRST || may_pair() {
        return None;
    }
    let (listen, slot) = agent_listener(config, v4, true);
    (listen.is_set() && listener_alive(slot)).then_some(listen)
}

/// The agent's address of the family (`v4`) for ports of one kind (`client_first` or any), and
/// the `AGENT_LISTENERS` slot of its listener.
#[inline(always)]
fn agent_listener(config: &AgentConfig, v4: bool, client_first: bool) -> (Endpoint, u32) {
    match (v4, client_first) {
        (true, false) => (config.listen_v4, LISTENER_V4),
        (false, false) => (config.listen_v6, LISTENER_V6),
        (true, true) => (config.client_first_v4, LISTENER_CLIENT_FIRST_V4),
        (false, true) => (config.client_first_v6, LISTENER_CLIENT_FIRST_V6),
    }
}

/// Whether the agent's listener for `slot` is in `AGENT_LISTENERS`, i.e. still open.
#[inline(always)]
fn listener_alive(slot: u32) -> bool {
    // SAFETY: a sockmap lookup from a program returns a referenced socket or null; the reference is
    // released at once, the verifier checks that.
    unsafe {
        let sk = bpf_map_lookup_elem(map_ptr(&AGENT_LISTENERS), core::ptr::from_ref(&slot).cast());
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk);
    }
    true
}
