//! The maps shared by the programs and the agent. Layouts and names: `proxy-common`.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SkStorage, SockHash, SockMap},
    macros::btf_map,
};
use proxy_common::{
    counters, AgentConfig, CallerKey, PodKey, RedirectRecord, ServiceKey, SocketPair,
    LISTENER_SLOTS, MAX_CALLERS, MAX_LOCAL_PODS, MAX_LOCAL_SOCKETS, MAX_MESH_SERVICES,
};

/// The VIP:port pairs to redirect (a set: the value is always 1). Written only by the agent.
#[btf_map]
pub(crate) static MESH_SERVICES: HashMap<ServiceKey, u8, { MAX_MESH_SERVICES as usize }> =
    HashMap::new();

/// The agent's listeners (`LISTENER_V4`, `LISTENER_V6`). The kernel removes a socket from a sockmap
/// when it closes, also when the agent is killed, so a present entry means "the agent is accepting".
#[btf_map]
pub(crate) static AGENT_LISTENERS: SockMap<{ LISTENER_SLOTS as usize }> = SockMap::new();

/// The sockets of node-local connections through the agent, keyed by their own two ends: a
/// socket's peer is under the same pair swapped. `gamma_local_msg` is attached to it (`local`).
#[btf_map]
pub(crate) static LOCAL_SOCKETS: SockHash<SocketPair, { MAX_LOCAL_SOCKETS as usize }> =
    SockHash::new();

/// Active ends in `LOCAL_SOCKETS` whose passive end has not joined yet (set: the value is 1). LRU:
/// an end whose peer never joins (a pod outside the programs' cgroup) is evicted in time.
#[btf_map]
pub(crate) static LOCAL_PENDING: LruHashMap<SocketPair, u8, { MAX_LOCAL_SOCKETS as usize }> =
    LruHashMap::new();

/// How a socket of `LOCAL_SOCKETS` sends (`local::SEND_*`): set undecided when it joins, decided at
/// its first send.
#[btf_map]
pub(crate) static LOCAL_SEND: SkStorage<u32> = SkStorage::new();

/// The addresses of this node's pods that opted in to local sockets (a set: the value is always 1),
/// written by the agent: only their connections through the agent join `LOCAL_SOCKETS` (a caller's
/// to the agent, the agent's to a backend), as only they can find their peer there and say they
/// can be sent bytes that way. One more entry than pods: `ANY_POD_OPTED_IN`.
#[btf_map]
pub(crate) static LOCAL_PODS: HashMap<PodKey, u8, { MAX_LOCAL_PODS as usize + 1 }> = HashMap::new();

/// Marks the sockets the agent dialled to a pod of this node (its value is unused): their
/// connections are candidates for `LOCAL_SOCKETS`. Set at connect() only for processes of the
/// agent's cgroup; dropped when such a socket connects again elsewhere.
#[btf_map]
pub(crate) static AGENT_DIALS: SkStorage<u8> = SkStorage::new();

/// One entry: the agent's addresses and cgroup.
#[btf_map]
pub(crate) static CONFIG: Array<AgentConfig, 1> = Array::new();

/// Per-socket record of a redirected connect(). Socket storage lives exactly as long as the socket,
/// so records of connections that never complete cannot accumulate, and getpeername can always find
/// the record of a live socket.
#[btf_map]
pub(crate) static REDIRECTED: SkStorage<RedirectRecord> = SkStorage::new();

/// Records of established redirected connections, keyed by the caller's local address, until the
/// agent accepts the connection and takes the record. LRU: records the agent never claims (caller
/// gone before accept) are evicted instead of filling the map.
#[btf_map]
pub(crate) static CALLERS: LruHashMap<CallerKey, RedirectRecord, { MAX_CALLERS as usize }> =
    LruHashMap::new();

/// Event counts, per CPU (indexes: `proxy_common::counters`). Read by the agent for /metrics.
#[btf_map]
pub(crate) static COUNTERS: PerCpuArray<u64, { counters::SLOTS as usize }> = PerCpuArray::new();

/// Adds one to counter `index` on this CPU (no other CPU writes it: no atomic needed).
#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a valid per-CPU map value of this CPU, for the program's run.
        unsafe { *counter += 1 };
    }
}

/// The raw map pointer helpers expect (aya-ebpf keeps its own `as_ptr` crate-private).
#[inline(always)]
pub(crate) fn map_ptr<M>(map: &M) -> *mut core::ffi::c_void {
    core::ptr::from_ref(map).cast_mut().cast()
}
