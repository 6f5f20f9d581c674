//! The `#[repr(C)]` types shared by the eBPF programs (`proxy-ebpf`) and the agent (`proxy-agent`):
//! map keys and values, compiled by both sides from this one place.
//!
//! Byte order: every address and port here is stored exactly as the kernel hands it to a BPF program,
//! in network byte order (big-endian) in memory. The agent converts at the edge (see
//! `proxy-agent/src/redirect/addr.rs`); the programs copy words without swapping, except for the one
//! field the kernel itself gives in host order (`bpf_sock_ops.local_port`).
//!
//! Padding is always explicit and zeroed: hash maps compare keys byte by byte, so an uninitialised
//! padding byte would make two equal keys differ.
#![no_std]

/// An IP address and TCP port, IPv4 or IPv6, in one layout so one map serves both families.
///
/// `ip` holds the 16 bytes of an IPv6 address in network byte order, as four `u32` words that are
/// read and written without swapping (the kernel's `user_ip6`/`local_ip6` words). An IPv4 address is
/// stored **v4-mapped** (`::ffff:a.b.c.d`): words 0 and 1 are zero, word 2 is the bytes
/// `00 00 ff ff`, word 3 the IPv4 address in network byte order (the kernel's `user_ip4`). The mapped
/// form is what an IPv6 socket passes to `connect()` for an IPv4 destination, so connect4 and
/// connect6 (dual-stack sockets) produce the same key for the same IPv4 destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Endpoint {
    /// IPv6 address, or v4-mapped IPv4 address, network byte order.
    pub ip: [u32; 4],
    /// TCP port, network byte order (the low 16 bits of the kernel's `user_port`).
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
}

/// Both ends of an established TCP connection as seen from one of its sockets: the key of the
/// node-local socket pairs (`LOCAL_SOCKETS`). A socket's peer is found under the same pair swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SocketPair {
    pub local: Endpoint,
    pub remote: Endpoint,
}

impl SocketPair {
    /// The same connection as its other end sees it: that socket's key.
    pub const fn peer(self) -> Self {
        Self {
            local: self.remote,
            remote: self.local,
        }
    }
}

/// Word 2 of a v4-mapped address, as it sits in memory: bytes `00 00 ff ff`.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Endpoint {
    /// An IPv4 endpoint from the kernel's representation: `ip4` as `user_ip4`/`local_ip4` (network
    /// byte order), `port` in network byte order.
    pub const fn v4(ip4: u32, port: u16) -> Self {
        Self {
            ip: [0, 0, V4_MAPPED_WORD, ip4],
            port,
            _pad: 0,
        }
    }

    /// An IPv6 endpoint from the kernel's representation (`user_ip6`/`local_ip6` words, network byte
    /// order), `port` in network byte order. A v4-mapped `ip6` yields the same value as [`Self::v4`].
    pub const fn v6(ip6: [u32; 4], port: u16) -> Self {
        Self {
            ip: ip6,
            port,
            _pad: 0,
        }
    }

    /// Whether the address is an IPv4 address (stored v4-mapped).
    pub const fn is_v4(&self) -> bool {
        self.ip[0] == 0 && self.ip[1] == 0 && self.ip[2] == V4_MAPPED_WORD
    }

    /// The IPv4 address in network byte order (word 3); meaningful only when [`Self::is_v4`].
    pub const fn ip4(&self) -> u32 {
        self.ip[3]
    }

    /// Whether this endpoint is set (a zero port means "absent", e.g. no listener for that family).
    pub const fn is_set(&self) -> bool {
        self.port != 0
    }
}

/// Key of `MESH_SERVICES`: a Service VIP and port whose connections the agent takes over.
/// The value says which of the agent's listeners they go to: [`STEER_ANY`] or
/// [`STEER_CLIENT_FIRST`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub vip: Endpoint,
}

/// Key of `LOCAL_PODS`: the address of a pod on this node that opted in to local sockets (v4-mapped
/// for IPv4, as in [`Endpoint`]), or [`ANY_POD_OPTED_IN`].
/// The value is a `u8` that is always 1 (the map is a set).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PodKey {
    pub ip: [u32; 4],
}

/// In `LOCAL_PODS` while any pod is (`::`, no socket's address): with local sockets on, ports
/// whose clients speak first are then steered as any other, because which pod dials is not known
/// at connect(), and a caller's socket pairs only if the agent's end exists at its first send,
/// which the client-first listener makes only with those first bytes.
pub const ANY_POD_OPTED_IN: PodKey = PodKey { ip: [0; 4] };

/// Key of `CALLERS`: a redirected, established connection as the agent sees it on `accept()`:
/// the caller's local address (the peer address of the accepted socket) and the agent's
/// listener port it was steered to. The port tells apart two connections from one caller
/// address to the agent's two listeners (Linux gives a source port to connects to different
/// destinations; a bound socket chooses its own): keyed by the address alone, the second's
/// record replaced the first's, and the first went to the second's Service.
///
/// The layout is the one before the listener port was in it (an [`Endpoint`]: address, port,
/// padding) with the port where the padding was: an older agent's programs wrote 0 there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CallerKey {
    /// The caller's address, as in [`Endpoint`].
    pub ip: [u32; 4],
    /// The caller's port, network byte order.
    pub port: u16,
    /// The agent's listener port, network byte order ([`Self::OLDER_PROGRAMS`] from programs
    /// older than it).
    pub agent_port: u16,
}

impl CallerKey {
    /// What programs older than the listener port in the key wrote there.
    pub const OLDER_PROGRAMS: u16 = 0;

    /// The key of a connection from `caller` to the agent's listener port `agent_port` (network
    /// byte order).
    pub const fn new(caller: Endpoint, agent_port: u16) -> Self {
        Self {
            ip: caller.ip,
            port: caller.port,
            agent_port,
        }
    }
}

/// What the kernel recorded about a redirected `connect()`: where the caller meant to go and who
/// the caller is. Stored per socket at connect time (`REDIRECTED`, socket storage) and copied into
/// `CALLERS` once the connection is established.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RedirectRecord {
    /// `bpf_get_netns_cookie` of the caller's socket: identifies its network namespace (host order).
    pub netns_cookie: u64,
    /// `bpf_get_current_cgroup_id` at `connect()`: the inode number of the caller's cgroup v2
    /// directory (host order).
    pub cgroup_id: u64,
    /// `bpf_get_socket_cookie` of the caller's socket (host order); for correlation in logs.
    pub socket_cookie: u64,
    /// The destination the caller passed to `connect()`: the Service VIP and port.
    pub original_dst: Endpoint,
    /// Always zero (keeps the size a multiple of 8 without implicit padding).
    pub _pad: u32,
}

/// The single entry of `CONFIG`: where redirected connections go and whose sockets are exempt.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AgentConfig {
    /// The agent's IPv4 listen address (v4-mapped); port 0 means "no IPv4 listener: leave IPv4
    /// connections alone". Its listener is in `AGENT_LISTENERS[LISTENER_V4]`.
    pub listen_v4: Endpoint,
    /// The agent's IPv6 listen address; port 0 means "no IPv6 listener". Its listener is in
    /// `AGENT_LISTENERS[LISTENER_V6]`.
    pub listen_v6: Endpoint,
    /// The agent's IPv4 address for ports whose clients speak first ([`STEER_CLIENT_FIRST`]);
    /// port 0: none, they go to `listen_v4`. Its listener is in
    /// `AGENT_LISTENERS[LISTENER_CLIENT_FIRST_V4]`.
    pub client_first_v4: Endpoint,
    /// The same for IPv6 (`AGENT_LISTENERS[LISTENER_CLIENT_FIRST_V6]`).
    pub client_first_v6: Endpoint,
    /// The agent's own cgroup id (host order): sockets created by processes of that cgroup are never
    /// redirected, so the agent cannot loop into itself when it dials a Service VIP.
    pub agent_cgroup_id: u64,
    /// Nonzero: node-local connections through the agent move their bytes socket to socket
    /// (`LOCAL_SOCKETS`); zero: every connection takes the TCP path.
    pub local_sockets: u32,
    /// Always zero.
    pub _pad: u32,
}

/// `AGENT_LISTENERS` slot holding the listener that accepts redirected IPv4 connections.
pub const LISTENER_V4: u32 = 0;
/// `AGENT_LISTENERS` slot holding the listener that accepts redirected IPv6 connections.
pub const LISTENER_V6: u32 = 1;
/// `AGENT_LISTENERS` slot of the IPv4 listener for ports whose clients speak first.
pub const LISTENER_CLIENT_FIRST_V4: u32 = 2;
/// `AGENT_LISTENERS` slot of the IPv6 listener for ports whose clients speak first.
pub const LISTENER_CLIENT_FIRST_V6: u32 = 3;
/// Number of `AGENT_LISTENERS` slots.
pub const LISTENER_SLOTS: u32 = 4;

/// `MESH_SERVICES` value: the port may carry any protocol (its connections go to the agent's
/// listener, `listen_v4`/`listen_v6`, which hands them on at the handshake).
pub const STEER_ANY: u8 = 1;
/// `MESH_SERVICES` value: the port's clients speak first (it declares HTTP). Its connections go
/// to the agent's client-first listener when it has one (`client_first_v4`/`client_first_v6`),
/// which hands them on only with their first bytes; else as [`STEER_ANY`].
pub const STEER_CLIENT_FIRST: u8 = 2;

/// Capacity of `MESH_SERVICES` (VIP:port pairs). A full map refuses new entries; the agent reports it.
pub const MAX_MESH_SERVICES: u32 = 65_536;
/// Capacity of `CALLERS` (LRU): records of connections established but not yet accepted. Unclaimed
/// records (the agent never accepted them) are evicted oldest first.
pub const MAX_CALLERS: u32 = 65_536;

/// Capacity of `LOCAL_SOCKETS` (sockets of node-local connections through the agent) and of
/// `LOCAL_PENDING`. A socket that finds the map full keeps the TCP path.
pub const MAX_LOCAL_SOCKETS: u32 = 65_536;

/// Capacity of `LOCAL_PODS` (addresses of this node's opted-in pods; kubelet's default is 110 pods): room
/// for an agent that watches every node's Pods (no node name) on a mid-sized cluster. A larger set
/// is refused whole (the previous one stays, and the agent logs it).
pub const MAX_LOCAL_PODS: u32 = 16_384;

/// What the programs count, per CPU, in `COUNTERS` (a per-CPU array indexed by these; the agent
/// sums the CPUs). Kept per CPU so that counting costs no atomic operation on the connect path.
pub mod counters {
    /// connect() to a mesh Service sent to the agent.
    pub const STEERED: u32 = 0;
    /// connect() to a mesh Service left alone because the agent's listener is gone (fail open).
    pub const AGENT_GONE: u32 = 1;
    /// A redirect record that could not be stored (socket storage at connect, `CALLERS` once
    /// established): the connection is left alone, or the agent loses its original destination.
    pub const RECORD_FAILED: u32 = 2;
    /// getpeername() answered with the Service VIP instead of the agent.
    pub const PEERNAME_REWRITES: u32 = 3;
    /// A node-local connection through the agent whose two sockets were paired.
    pub const LOCAL_PAIRED: u32 = 4;
    /// A socket in `LOCAL_SOCKETS` whose first send found its peer paired: its bytes move.
    pub const LOCAL_MOVED: u32 = 5;
    /// A socket in `LOCAL_SOCKETS` whose first send found no paired peer (one still in its
    /// handshake, or outside the programs' cgroup), or that sent before it joined: its bytes take
    /// TCP, all of them, so that none overtakes another.
    pub const LOCAL_KEPT_TCP: u32 = 6;
    /// Of `STEERED`, those sent to the agent's client-first listener.
    pub const STEERED_CLIENT_FIRST: u32 = 7;
    /// Number of counters.
    pub const SLOTS: u32 = 8;
}

/// Map names, shared so the agent looks up exactly what the programs define.
pub mod maps {
    pub const COUNTERS: &str = "COUNTERS";
    pub const MESH_SERVICES: &str = "MESH_SERVICES";
    pub const AGENT_LISTENERS: &str = "AGENT_LISTENERS";
    pub const CONFIG: &str = "CONFIG";
    pub const REDIRECTED: &str = "REDIRECTED";
    pub const CALLERS: &str = "CALLERS";
    pub const LOCAL_SOCKETS: &str = "LOCAL_SOCKETS";
    pub const LOCAL_PODS: &str = "LOCAL_PODS";
    /// Each socket's storage, present once it joined `LOCAL_SOCKETS`: the agent asks it whether a
    /// socket may be sent bytes that splice(2) would not see.
    pub const LOCAL_SEND: &str = "LOCAL_SEND";
}

/// Program names (the functions' names; the kernel keeps the first 15 bytes, all of these fit).
pub mod programs {
    pub const CONNECT4: &str = "gamma_connect4";
    pub const CONNECT6: &str = "gamma_connect6";
    pub const SOCKOPS: &str = "gamma_sockops";
    pub const GETPEERNAME4: &str = "gamma_peername4";
    pub const GETPEERNAME6: &str = "gamma_peername6";
    /// The `sk_msg` program on `LOCAL_SOCKETS` (attached to the map, not to the cgroup).
    pub const LOCAL_MSG: &str = "gamma_local_msg";
    /// Every cgroup program, in attach order.
    pub const ALL: [&str; 5] = [CONNECT4, CONNECT6, SOCKOPS, GETPEERNAME4, GETPEERNAME6];
    /// Prefix shared by every program name: how a restarted agent recognises a predecessor's
    /// attachments.
    pub const PREFIX: &str = "gamma_";
}

#[cfg(feature = "user")]
mod user {
    use super::{AgentConfig, CallerKey, Endpoint, PodKey, RedirectRecord, ServiceKey, SocketPair};

    // SAFETY: all are #[repr(C)], Copy, made only of integers, with explicit padding fields.
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for PodKey {}
    unsafe impl aya::Pod for CallerKey {}
    unsafe impl aya::Pod for SocketPair {}
    unsafe impl aya::Pod for RedirectRecord {}
    unsafe impl aya::Pod for AgentConfig {}
}

// The layouts are an ABI between two compilers: fail the build, not the verifier, if they drift.
const _: () = {
    assert!(core::mem::size_of::<Endpoint>() == 20);
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<CallerKey>() == 20);
    assert!(core::mem::size_of::<RedirectRecord>() == 48);
    assert!(core::mem::size_of::<AgentConfig>() == 96);
    assert!(core::mem::size_of::<SocketPair>() == 40);
    assert!(core::mem::size_of::<PodKey>() == 16);
};
