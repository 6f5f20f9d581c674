//! `cgroup/getpeername4` and `cgroup/getpeername6`: a redirected socket's peer is the VIP:port the
//! application dialled, not the agent.

use aya_ebpf::{bindings::bpf_sock_addr, macros::cgroup_sock_addr, programs::SockAddrContext};
use proxy_common::{counters, RedirectRecord};

use crate::{
    ctx_access,
    maps::{count, REDIRECTED},
    ALLOW,
};

#[cgroup_sock_addr(getpeername4)]
pub fn gamma_peername4(ctx: SockAddrContext) -> i32 {
    if let Some(record) = redirected(&ctx) {
        let sa: *mut bpf_sock_addr = ctx.sock_addr;
        // SAFETY: valid context; whole-u32 stores.
        unsafe {
            (*sa).user_ip4 = record.original_dst.ip4();
            (*sa).user_port = u32::from(record.original_dst.port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn gamma_peername6(ctx: SockAddrContext) -> i32 {
    if let Some(record) = redirected(&ctx) {
        let sa: *mut bpf_sock_addr = ctx.sock_addr;
        // SAFETY: as above. An IPv4 VIP dialled from a dual-stack socket is stored v4-mapped, which
        // is how such a socket reports an IPv4 peer.
        unsafe {
            ctx_access::write_ip6(&raw mut (*sa).user_ip6, record.original_dst.ip);
            (*sa).user_port = u32::from(record.original_dst.port);
        }
    }
    ALLOW
}

/// The record connect() left on this socket, if it was redirected.
#[inline(always)]
fn redirected(ctx: &SockAddrContext) -> Option<RedirectRecord> {
    // SAFETY: the context's socket is valid; the pointer is checked for null.
    let record = unsafe { REDIRECTED.get_ptr_mut(ctx) };
    if record.is_null() {
        None
    } else {
        count(counters::PEERNAME_REWRITES);
        // SAFETY: non-null storage of this socket.
        Some(unsafe { *record })
    }
}
