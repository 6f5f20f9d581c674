//! gamma-node's kernel programs: steer pods' `connect()` to mesh Services to the node agent.
//!
//! - `cgroup/connect4`, `cgroup/connect6` ([`connect`]): a TCP connect to a VIP:port listed in
//!   `MESH_SERVICES` is rewritten to the agent's address, if the agent's listener is alive; the
//!   original destination and the caller's identity are stored with the socket.
//! - `sockops` ([`sockops`]): once such a connection is established, its record is copied into
//!   `CALLERS`, keyed by the caller's local ip:port, which is the peer the agent sees on `accept()`.
//! - `cgroup/getpeername4`, `cgroup/getpeername6` ([`peername`]): a redirected socket reports the VIP
//!   as its peer, so the application sees what it dialled.
//! - With local sockets on: `sockops` also pairs the two ends of node-local connections through the
//!   agent, and `sk_msg` ([`local`]) moves what one end sends into the other's receive queue.
//!
//! Anything unexpected leaves the connection alone: the kernel programs fail open.
#![no_std]
#![no_main]

mod connect;
mod ctx_access;
mod local;
mod maps;
mod peername;
mod sockops;

/// Return value of cgroup sock_addr and sock_ops programs that lets the syscall proceed.
const ALLOW: i32 = 1;

/// `family` of an IPv4 socket in the programs' contexts.
const AF_INET: u32 = 2;

/// Declared explicitly (aya defaults to "GPL"): the project is Apache-2.0, and none of the helpers
/// used here is GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
