//! The kernel redirect ("design B" of issue 5): eBPF programs on the pods' cgroup steer `connect()`
//! calls to mesh Services to the agent, and tell the agent where each connection was going and who
//! made it.
//!
//! How a connection flows:
//! 1. A pod calls `connect(VIP:port)`. `cgroup/connect4|6` finds VIP:port in `MESH_SERVICES`, checks
//!    that the agent's listener is alive (it is in the `AGENT_LISTENERS` sockmap; the kernel drops
//!    it when the socket closes, also on kill -9) and that the caller is not the agent itself (its
//!    cgroup differs from `AgentConfig::agent_cgroup_id`). It stores the original VIP:port, the
//!    caller's netns cookie and cgroup id with the socket, and rewrites the destination to the
//!    agent. Any failed check leaves the connection alone: it goes to the VIP as usual.
//! 2. When the connection is established, `sockops` copies the record to `CALLERS`, keyed by the
//!    caller's ip:port and the agent's listener port, before the agent can accept it.
//! 3. The agent accepts and calls [`Redirect::take_original`] with the peer address and the
//!    listener's port.
//! 4. `getpeername` in the pod returns the VIP:port, not the agent's address.
//!
//! **Pinning: none.** Programs are attached through bpf_links held by the agent's process and the
//! maps live only as long as it does. When the agent exits or dies, the kernel detaches everything
//! and pods' connections to Service VIPs go to kube-proxy's routing as if the mesh were absent
//! (no mesh routes, but no blackhole) until the agent is back and has called
//! [`Redirect::set_mesh_services`]. The same fail-open holds while the agent runs but has closed its
//! listener. Pinning would keep the programs across restarts but buys nothing here, since the
//! sockmap check already makes a dead agent's programs inert, and it would leave programs and maps
//! of an old agent version behind after an upgrade or uninstall. A restart therefore starts clean;
//! an agent that is still running when its successor attaches has its programs detached by the
//! successor (see `attach.rs`), so each program is attached once: [`attached_programs`] shows it.
//!
//! **Takeover** (hitless restart, `takeover.rs`): instead of starting clean, a successor can be
//! handed the running agent's links, maps and listener over a Unix socket and keep them (same
//! programs) or swap its own in without a gap (different programs).
//!
//! Map layouts and byte order: `proxy-common`.

mod addr;
mod attach;
mod bpf_sys;
mod cgroup;
mod error;
mod identity;
mod object;
mod probe;
mod sets;
mod takeover;

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr, TcpListener},
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Mutex, MutexGuard, PoisonError,
    },
};

use aya::maps::{Array, Map, MapData, MapError, PerCpuArray, SkStorage, SockMap};
use proxy_common::{
    counters, maps, AgentConfig, CallerKey, Endpoint, PodKey, RedirectRecord, ServiceKey,
    LISTENER_CLIENT_FIRST_V4, LISTENER_CLIENT_FIRST_V6, LISTENER_V4, LISTENER_V6,
};

pub use attach::{attached_programs, AttachedProgram};
pub use cgroup::{
    cgroup2_mount, cgroup_id, own_cgroup_id, pod_uid, scan as scan_cgroups, CgroupDirs,
};
pub use error::RedirectError;
pub use identity::KernelRedirects;
pub use object::{object_digest, verify_programs, OBJECT};
pub use probe::{check_kernel, KernelFeature, MissingKernelFeatures};
pub use sets::SetChange;
pub use takeover::{Predecessor, RedirectOffer, TakeoverKind};

use attach::OwnedLink;
use sets::KernelMap;

/// The agent's listener for redirected connections of one address family, and the address pods
/// must dial to reach it (it must be reachable from the pods' network namespaces).
#[derive(Debug, Clone, Copy)]
pub struct AgentListener<'a> {
    pub listener: &'a TcpListener,
    pub addr: SocketAddr,
    /// For ports whose clients speak first only (`proxy_common::STEER_CLIENT_FIRST`); the
    /// family's listener for any port must be given too.
    pub client_first: bool,
}

/// Where a redirected connection was going and who opened it, as the kernel saw it at `connect()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirected {
    /// The Service VIP:port the caller dialled.
    pub original_dst: SocketAddr,
    /// The caller's network namespace (`bpf_get_netns_cookie`).
    pub netns_cookie: u64,
    /// The caller's cgroup v2 id; [`CgroupDirs::path_of`] and [`pod_uid`] turn it into a pod.
    pub cgroup_id: u64,
    /// The caller socket's cookie, to correlate with other kernel-side observations.
    pub socket_cookie: u64,
}

/// The loaded and attached programs and their maps. Dropping it detaches the programs (fail open),
/// unless a successor holds them too (see `takeover.rs`).
///
/// All methods take `&self`, so one `Arc<Redirect>` serves the accept loops (lock-free
/// [`Self::take_original`]) and the snapshot consumer (serialised [`Self::set_mesh_services`]).
pub struct Redirect {
    cgroup: PathBuf,
    cgroup_id: u64,
    /// The addresses pods are sent to (the `CONFIG` entry).
    listening: Mutex<Listening>,
    /// The programs' `AGENT_LISTENERS`, where [`Self::add_listeners`] puts a family's listeners
    /// opened after the start (programs are adopted only with it: `takeover::adopts`).
    listener_slots: Mutex<SockMap<MapData>>,
    services: Mutex<KernelMap<ServiceKey>>,
    /// Mesh frontends left out of `services` at the last [`Self::set_mesh_services`]: of an
    /// address family this agent has no listener for.
    without_listener: AtomicUsize,
    /// The version of the last table whose mesh frontends `services` holds ([`Self::told_table`]).
    table_version: AtomicU64,
    /// This node's pods that opted in to local sockets (`LOCAL_PODS`), told only while they are on.
    local_pods: Mutex<KernelMap<PodKey>>,
    config: Mutex<Array<MapData, AgentConfig>>,
    /// The config of adopted programs, written to `config` only at
    /// [`Self::complete_takeover`]: until the running agent has stopped accepting, its programs
    /// must keep the config it serves by (its exempt cgroup; pairing, which it may not know of
    /// and would splice sockets the kernel pairs, stalling them), also when this agent goes away
    /// before.
    config_at_takeover: Mutex<Option<AgentConfig>>,
    callers: MapData,
    /// What the programs counted (`proxy_common::counters`), per CPU.
    counters: PerCpuArray<MapData, u64>,
    /// `CALLERS` of a predecessor whose programs differ from ours (an upgrade): connections its
    /// connect programs steered have their records there. Looked up when ours has none.
    predecessor_callers: Option<MapData>,
    /// Descriptors of the [`SHARED_MAPS`] (and of [`PAIR_RECORDS`] when this agent has them),
    /// named, to hand to a successor.
    shared_maps: Vec<(&'static str, OwnedFd)>,
    /// See [`Self::sockets_may_be_paired`].
    paired_sockets: AtomicBool,
    /// Where the programs serving for this agent record the sockets that joined the pairs
    /// ([`PAIR_RECORDS`]): their own and, after a takeover that swapped programs in, the
    /// predecessor's. `None` when one of them is not at hand (a predecessor older than these
    /// records did not hand its over): then any socket may be paired. See [`Self::may_be_paired`].
    pair_records: Option<Vec<PairRecords>>,
    programs: Mutex<Programs>,
}

/// The addresses pods are sent to: of the listeners for any port, and of those for ports whose
/// clients speak first.
#[derive(Debug, Default)]
struct Listening {
    listen: Vec<SocketAddr>,
    client_first: Vec<SocketAddr>,
}

impl Listening {
    fn of(listeners: &[AgentListener<'_>]) -> Mutex<Self> {
        Mutex::new(Listening {
            listen: takeover::addresses(listeners, false),
            client_first: takeover::addresses(listeners, true),
        })
    }
}

/// The maps a successor running the same programs adopts: the ones an agent writes, the counters
/// (so that they go on counting across a takeover), and the local sockets' sockhash.
pub(crate) const SHARED_MAPS: [&str; 6] = [
    maps::MESH_SERVICES,
    maps::LOCAL_PODS,
    maps::CONFIG,
    maps::CALLERS,
    maps::COUNTERS,
    // Not written by the agent, but its sk_msg program stays attached only while a process holds
    // the map (programs using a sockhash do not keep its programs).
    maps::LOCAL_SOCKETS,
];

/// The map recording, on each socket, that it joined `LOCAL_SOCKETS` (its storage exists from
/// then on). Handed to a successor with the [`SHARED_MAPS`], but not required from a predecessor:
/// agents before it did not hand it over.
pub(crate) const PAIR_RECORDS: &str = maps::LOCAL_SEND;

/// The maps handed to a successor if at hand, not required from a predecessor (agents before them
/// did not hand them over): [`PAIR_RECORDS`], and the listeners' sockmap, where a successor that
/// adopts the programs adds a family's listeners ([`Redirect::add_listeners`]).
pub(crate) const OPTIONAL_SHARED_MAPS: [&str; 2] = [PAIR_RECORDS, maps::AGENT_LISTENERS];

/// A [`PAIR_RECORDS`] map (its value, the socket's send decision, is not read here).
type PairRecords = SkStorage<MapData, u32>;

/// The kernel programs' counts since they were loaded (summed over the CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// connect() to a mesh Service sent to the agent.
    pub steered: u64,
    /// Of those, the ones sent to the client-first listener.
    pub steered_client_first: u64,
    /// connect() to a mesh Service left alone: the agent's listener was gone (fail open).
    pub agent_gone: u64,
    /// Not a count but a size: the mesh frontends told to the programs after the last table.
    pub mesh_frontends: u64,
    /// Mesh frontends not told to the programs: of an address family without a listener.
    pub frontends_without_listener: u64,
    /// The table version the programs' mesh frontends are of.
    pub table_version: u64,
    /// Redirect records that could not be stored.
    pub record_failed: u64,
    /// getpeername() answered with the Service VIP.
    pub peername_rewrites: u64,
    /// Node-local connections through the agent whose sockets were paired (bytes moved socket to
    /// socket).
    pub local_paired: u64,
    /// Sockets of such connections whose bytes move (their peer was paired at their first send).
    pub local_moved: u64,
    /// Sockets that joined but keep TCP (no paired peer at their first send: one still in its
    /// handshake, or outside the programs' cgroup; or they sent before joining).
    pub local_kept_tcp: u64,
    /// Not a count but a size: the addresses in `LOCAL_PODS` after the last table.
    pub local_pods: u64,
}

/// The programs on the cgroup and who holds them.
struct Programs {
    /// The links that serve the cgroup for this agent (its own, or a predecessor's it adopted).
    links: Vec<OwnedLink>,
    /// A predecessor's links still attached: before [`Redirect::complete_takeover`] all of them;
    /// after it, its sockops and getpeername programs, kept for the connections its connect
    /// programs steered (recorded on their sockets in its maps) until this agent exits.
    predecessor: Vec<OwnedLink>,
    /// Programs loaded but not attached yet (a takeover with programs of our own).
    pending: Option<aya::Ebpf>,
    /// Swapping our programs in failed part-way: the predecessor's may still steer, into maps a
    /// successor would not get, so this agent must not be taken over.
    swap_failed: bool,
    /// Keeps the object's program and map handles alive (the links keep the programs attached).
    _object: Option<aya::Ebpf>,
}

/// Links are detached in the reverse of their attach order ([`attach::ATTACH_ORDER`]): the
/// connect hooks first, then the observers that record and report what they steered, so that no
/// connection is steered without its record.
impl Drop for Programs {
    fn drop(&mut self) {
        while let Some(link) = self.links.pop() {
            drop(link);
        }
    }
}

/// A freshly loaded object with its maps filled, programs loaded, nothing attached.
struct Loaded {
    ebpf: aya::Ebpf,
    services: KernelMap<ServiceKey>,
    local_pods: KernelMap<PodKey>,
    config: Array<MapData, AgentConfig>,
    callers: MapData,
    counters: PerCpuArray<MapData, u64>,
    pair_records: PairRecords,
    shared_maps: Vec<(&'static str, OwnedFd)>,
    listener_slots: SockMap<MapData>,
}

impl Redirect {
    /// Loads the programs, points them at `listeners` (at most one per address family; a family
    /// without a listener is never redirected), and attaches them to the cgroup v2 directory
    /// `cgroup`, replacing those of a previous agent. Nothing is redirected until
    /// [`Self::set_mesh_services`] names the Services.
    ///
    /// The calling process's cgroup is exempt: the agent's own connections to a VIP are never
    /// redirected (see [`Self::set_exempt_cgroup`]).
    ///
    /// A kernel that lacks a feature the redirect needs gets nothing attached
    /// ([`RedirectError::MissingKernelFeatures`], see [`check_kernel`]).
    pub fn attach(cgroup: &Path, listeners: &[AgentListener<'_>]) -> Result<Self, RedirectError> {
        check_kernel()?;
        let cgroup_file = attach::open_cgroup(cgroup)?;
        let mut loaded = Self::load(listeners)?;
        let links = attach::attach_all(&mut loaded.ebpf, &cgroup_file)?;
        let ours: HashSet<u32> = links.iter().map(|l| l.program_id).collect();
        attach::detach_others(&cgroup_file, &ours)?;
        Ok(Self {
            cgroup: cgroup.to_owned(),
            cgroup_id: cgroup::cgroup_id(cgroup)?,
            listening: Listening::of(listeners),
            listener_slots: Mutex::new(loaded.listener_slots),
            services: Mutex::new(loaded.services),
            without_listener: AtomicUsize::new(0),
            table_version: AtomicU64::new(0),
            local_pods: Mutex::new(loaded.local_pods),
            config: Mutex::new(loaded.config),
            config_at_takeover: Mutex::default(),
            callers: loaded.callers,
            counters: loaded.counters,
            predecessor_callers: None,
            shared_maps: loaded.shared_maps,
            paired_sockets: AtomicBool::new(false),
            pair_records: Some(vec![loaded.pair_records]),
            programs: Mutex::new(Programs {
                links,
                predecessor: Vec::new(),
                pending: None,
                swap_failed: false,
                _object: Some(loaded.ebpf),
            }),
        })
    }

    /// Creates the maps, fills `CONFIG` and `AGENT_LISTENERS` and loads the programs (the
    /// verifier's verdict comes here, before anything is attached).
    fn load(listeners: &[AgentListener<'_>]) -> Result<Loaded, RedirectError> {
        let (config, slots) = agent_config(listeners, own_cgroup_id()?)?;
        let mut ebpf = object::load()?;
        // Taken before the maps are typed: typed maps do not show their descriptors.
        let shared_maps = SHARED_MAPS
            .into_iter()
            .chain(OPTIONAL_SHARED_MAPS)
            .map(|name| Ok((name, dup_map_fd(&ebpf, name)?)))
            .collect::<Result<Vec<_>, RedirectError>>()?;
        // Maps are filled before any program is attached, so no program sees a partial config.
        let mut config_map: Array<MapData, AgentConfig> = typed_map(&mut ebpf, maps::CONFIG)?;
        write_agent_config(&mut config_map, config)?;
        let mut listener_slots = typed_map(&mut ebpf, maps::AGENT_LISTENERS)?;
        put_listeners(&mut listener_slots, slots)?;
        let services = KernelMap::mesh_services(typed_map(&mut ebpf, maps::MESH_SERVICES)?);
        let local_pods = KernelMap::local_pods(typed_map(&mut ebpf, maps::LOCAL_PODS)?);
        let callers = callers_map(ebpf.take_map(maps::CALLERS))?;
        let counters = typed_map(&mut ebpf, maps::COUNTERS)?;
        let pair_records = typed_map(&mut ebpf, PAIR_RECORDS)?;
        object::load_all(&mut ebpf)?;
        object::attach_local_msg(&mut ebpf)?;
        object::follow_program_logs(&mut ebpf);
        Ok(Loaded {
            ebpf,
            services,
            local_pods,
            config: config_map,
            callers,
            counters,
            pair_records,
            shared_maps,
            listener_slots,
        })
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Notes that the mesh frontends told are those of table `version`: how far the kernel's
    /// steering is behind the table shows in `gamma_kernel_table_version`.
    pub fn told_table(&self, version: u64) {
        self.table_version.store(version, Ordering::Relaxed);
    }

    /// Makes the redirected VIP:ports exactly `frontends`, each with whether its clients speak
    /// first (then steered to the client-first listener, if any): writes the missing and the
    /// changed, removes the rest. A failure part-way leaves a mix of old and new; calling again
    /// repairs it.
    pub fn set_mesh_services(
        &self,
        frontends: impl IntoIterator<Item = (SocketAddr, bool)>,
    ) -> Result<SetChange, RedirectError> {
        // A frontend of a family without a listener is left to kube-proxy: the programs could
        // not steer it anywhere.
        let mut without_listener = 0;
        let listen = self.listening().listen.clone();
        let steerable = frontends.into_iter().filter(|(frontend, _)| {
            let ipv4 = addr::canonical(*frontend).is_ipv4();
            let listened = listen.iter().any(|l| l.is_ipv4() == ipv4);
            without_listener += usize::from(!listened);
            listened
        });
        let change = self
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .reconcile(sets::service_entries(steerable));
        let before = self
            .without_listener
            .swap(without_listener, Ordering::Relaxed);
        if without_listener > 0 && without_listener != before {
            tracing::warn!(
                frontends = without_listener,
                listeners = ?listen,
                "mesh Service frontends of an address family this agent does not listen on keep \
                 kube-proxy's routing, without mesh routes: give --redirect an address of that \
                 family the pods can reach (the node's), and restart the agent; with one, the log \
                 says why its listener did not open"
            );
        }
        change
    }

    /// Adds the listeners of an address family the programs send no pod to yet (its first
    /// ClusterIP appeared after the start): into `AGENT_LISTENERS`, then into `CONFIG`, so that
    /// the programs never send a pod to a listener they do not hold. The family's frontends are
    /// steered from the next [`Self::set_mesh_services`].
    pub fn add_listeners(&self, listeners: &[AgentListener<'_>]) -> Result<(), RedirectError> {
        let (added, slots) = agent_config(listeners, 0)?;
        let mut listening = self.listening();
        let ours = listening.listen.iter().chain(&listening.client_first);
        if let Some(taken) = ours.copied().find(|a| {
            let ipv4 = a.is_ipv4();
            listeners
                .iter()
                .any(|l| addr::canonical(l.addr).is_ipv4() == ipv4)
        }) {
            return Err(RedirectError::InvalidListener(format!(
                "the programs already send pods of this address family to {taken}"
            )));
        }
        put_listeners(
            &mut self
                .listener_slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            slots,
        )?;
        self.update_config(|config| {
            let fields = [
                (&mut config.listen_v4, added.listen_v4),
                (&mut config.listen_v6, added.listen_v6),
                (&mut config.client_first_v4, added.client_first_v4),
                (&mut config.client_first_v6, added.client_first_v6),
            ];
            for (field, new) in fields {
                if new.is_set() {
                    *field = new;
                }
            }
        })?;
        listening
            .listen
            .extend(takeover::addresses(listeners, false));
        listening
            .client_first
            .extend(takeover::addresses(listeners, true));
        Ok(())
    }

    fn listening(&self) -> MutexGuard<'_, Listening> {
        self.listening
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the set of this node's opted-in pods exactly `pods` (their addresses): with local
    /// sockets on, only their connections through the agent (theirs to it, its to them) join the
    /// socket pairs. Like
    /// [`Self::set_mesh_services`], a failure part-way is repaired by the next call.
    pub fn set_local_pods(
        &self,
        pods: impl IntoIterator<Item = IpAddr>,
    ) -> Result<SetChange, RedirectError> {
        self.local_pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .reconcile_pods(pods)
    }

    /// Reads and removes the record of a redirected connection accepted from `caller` (the peer
    /// address of the accepted socket) on the listener at port `listener_port`. `None`: the
    /// connection was not redirected by the kernel (a direct connection to the agent), or its
    /// record was evicted.
    pub fn take_original(&self, caller: SocketAddr, listener_port: u16) -> Option<Redirected> {
        let key = CallerKey::new(addr::endpoint(caller), listener_port.to_be());
        // Ours first: after a takeover's first instants, every record is there. A predecessor's
        // programs may be older than the listener port in the key.
        let older = CallerKey {
            agent_port: CallerKey::OLDER_PROGRAMS,
            ..key
        };
        take_record(&self.callers, &key, caller).or_else(|| {
            let theirs = self.predecessor_callers.as_ref()?;
            take_record(theirs, &key, caller).or_else(|| take_record(theirs, &older, caller))
        })
    }

    /// What the programs steering for this agent counted (since they were loaded; adopted
    /// programs keep their counts across a takeover).
    pub fn kernel_counters(&self) -> Result<KernelCounters, RedirectError> {
        let read = |index: u32| {
            self.counters
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum::<u64>())
                .map_err(|e| RedirectError::kernel("reading the COUNTERS map", e))
        };
        Ok(KernelCounters {
            steered: read(counters::STEERED)?,
            steered_client_first: read(counters::STEERED_CLIENT_FIRST)?,
            agent_gone: read(counters::AGENT_GONE)?,
            record_failed: read(counters::RECORD_FAILED)?,
            peername_rewrites: read(counters::PEERNAME_REWRITES)?,
            local_paired: read(counters::LOCAL_PAIRED)?,
            local_moved: read(counters::LOCAL_MOVED)?,
            local_kept_tcp: read(counters::LOCAL_KEPT_TCP)?,
            mesh_frontends: self
                .services
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .size() as u64,
            frontends_without_listener: self.without_listener.load(Ordering::Relaxed) as u64,
            table_version: self.table_version.load(Ordering::Relaxed),
            local_pods: self
                .local_pods
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pods() as u64,
        })
    }

    /// Exempts another cgroup instead of the agent's own: connections from processes of cgroup
    /// `cgroup_id` are never redirected. For deployments where the agent's cgroup is not the one
    /// its sockets are created in, and for tests.
    pub fn set_exempt_cgroup(&self, cgroup_id: u64) -> Result<(), RedirectError> {
        self.update_config(|config| config.agent_cgroup_id = cgroup_id)
    }

    /// Turns node-local socket pairing on or off for connections established from now on (see
    /// `proxy-ebpf/src/local.rs`): a caller's connection to the agent, and the agent's to a backend
    /// on this node, then move their bytes socket to socket instead of through TCP. The agent's
    /// own sockets of such connections must then be read with recv(2), not splice(2) (the moved
    /// bytes are not in the TCP queue splice reads): see [`Self::sockets_may_be_paired`].
    pub fn set_local_sockets(&self, on: bool) -> Result<(), RedirectError> {
        // Known before the programs may pair: a pump that asks in between copies (safe).
        self.paired_sockets.fetch_or(on, Ordering::Relaxed);
        self.update_config(|config| config.local_sockets = u32::from(on))
    }

    /// Whether sockets this agent serves may have been paired: local sockets are on here, or were
    /// in a predecessor it took over from (whose connections it serves on). Then none may be
    /// spliced. Handed on to a successor.
    pub fn sockets_may_be_paired(&self) -> bool {
        self.paired_sockets.load(Ordering::Relaxed)
    }

    /// Whether the kernel may move bytes into `socket` (one of this agent's, accepted or dialled):
    /// those bytes wait in a queue that recv(2) reads and splice(2) does not, so a pump must copy
    /// such a socket's bytes. Exact for the sockets the programs recorded joining the pairs (a
    /// lookup of the socket's storage; whether a socket joins is settled before its connect() or
    /// accept() returns), `false` at no cost while no socket may be paired at all, `true` when
    /// unsure (a record not at hand, or not readable).
    pub fn may_be_paired(&self, socket: BorrowedFd<'_>) -> bool {
        if !self.sockets_may_be_paired() {
            return false;
        }
        let Some(records) = &self.pair_records else {
            return true;
        };
        records
            .iter()
            .any(|map| !matches!(map.get(&socket, 0), Err(MapError::KeyNotFound)))
    }

    /// Whether the programs pair sockets now ([`Self::set_local_sockets`]), as their config says.
    pub fn local_sockets(&self) -> Result<bool, RedirectError> {
        Ok(self.read_config()?.local_sockets != 0)
    }

    fn read_config(&self) -> Result<AgentConfig, RedirectError> {
        read_agent_config(
            &self
                .config
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn update_config(&self, change: impl FnOnce(&mut AgentConfig)) -> Result<(), RedirectError> {
        let mut deferred = self
            .config_at_takeover
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(value) = deferred.as_mut() {
            change(value);
            return Ok(());
        }
        let mut config = self
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut value = read_agent_config(&config)?;
        change(&mut value);
        write_agent_config(&mut config, value)
    }
}

/// The one entry of `CONFIG`.
fn read_agent_config(map: &Array<MapData, AgentConfig>) -> Result<AgentConfig, RedirectError> {
    map.get(&0, 0)
        .map_err(|e| RedirectError::kernel("reading the agent config", e))
}

fn write_agent_config(
    map: &mut Array<MapData, AgentConfig>,
    value: AgentConfig,
) -> Result<(), RedirectError> {
    map.set(0, value, 0)
        .map_err(|e| RedirectError::kernel("writing the agent config", e))
}

impl crate::proxy::pump::Pairing for Redirect {
    fn may_be_paired(&self, socket: BorrowedFd<'_>) -> bool {
        Redirect::may_be_paired(self, socket)
    }
}

impl std::fmt::Debug for Redirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirect")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

/// Reads and removes the record of `key` from a `CALLERS` map.
fn take_record(callers: &MapData, key: &CallerKey, caller: SocketAddr) -> Option<Redirected> {
    match bpf_sys::map_take::<CallerKey, RedirectRecord>(callers.fd().as_fd(), key) {
        Ok(record) => record.map(|r| Redirected {
            original_dst: addr::socket_addr(&r.original_dst),
            netns_cookie: r.netns_cookie,
            cgroup_id: r.cgroup_id,
            socket_cookie: r.socket_cookie,
        }),
        Err(e) => {
            tracing::warn!(%caller, error = %e, "reading the redirect record failed");
            None
        }
    }
}

/// Which `AGENT_LISTENERS` slot each listener goes to.
type ListenerSlots<'a> = Vec<(u32, &'a TcpListener)>;

/// Puts each listener in its `AGENT_LISTENERS` slot.
fn put_listeners(
    map: &mut SockMap<MapData>,
    slots: ListenerSlots<'_>,
) -> Result<(), RedirectError> {
    for (slot, listener) in slots {
        map.set(slot, listener, 0).map_err(|e| {
            RedirectError::kernel(format!("putting listener {slot} in the sockmap"), e)
        })?;
    }
    Ok(())
}

/// The config map's value for `listeners`, after checking they make sense, and the sockmap slot
/// of each listener.
fn agent_config<'a>(
    listeners: &[AgentListener<'a>],
    agent_cgroup_id: u64,
) -> Result<(AgentConfig, ListenerSlots<'a>), RedirectError> {
    let invalid = |msg: String| Err(RedirectError::InvalidListener(msg));
    if listeners.is_empty() {
        return invalid(
            "no listener given: pass the agent's redirect listener and its address".into(),
        );
    }
    let mut config = AgentConfig {
        agent_cgroup_id,
        ..AgentConfig::default()
    };
    let mut slots = Vec::with_capacity(listeners.len());
    for l in listeners {
        let agent = addr::canonical(l.addr);
        let bound = l
            .listener
            .local_addr()
            .map_err(|e| RedirectError::io("reading the listener's address", e))?;
        if agent.ip().is_unspecified() || agent.port() == 0 {
            return invalid(format!(
                "{agent} cannot be dialled: give the address pods reach the agent at"
            ));
        }
        if bound.port() != agent.port() {
            return invalid(format!(
                "the listener is bound to {bound} but pods would be sent to port {}",
                agent.port()
            ));
        }
        if agent.is_ipv6() && bound.is_ipv4() {
            return invalid(format!(
                "{agent} is IPv6 but the listener ({bound}) is IPv4-only"
            ));
        }
        let (field, slot) = match (agent.is_ipv4(), l.client_first) {
            (true, false) => (&mut config.listen_v4, LISTENER_V4),
            (false, false) => (&mut config.listen_v6, LISTENER_V6),
            (true, true) => (&mut config.client_first_v4, LISTENER_CLIENT_FIRST_V4),
            (false, true) => (&mut config.client_first_v6, LISTENER_CLIENT_FIRST_V6),
        };
        if field.is_set() {
            return invalid(format!(
                "two listeners of one kind for the address family of {agent}"
            ));
        }
        *field = addr::endpoint(agent);
        slots.push((slot, l.listener));
    }
    let lone = |client_first: Endpoint, listen: Endpoint| client_first.is_set() && !listen.is_set();
    if lone(config.client_first_v4, config.listen_v4)
        || lone(config.client_first_v6, config.listen_v6)
    {
        return invalid(
            "a listener for ports whose clients speak first, without the listener for any port of \
             its address family"
                .into(),
        );
    }
    // A record is keyed by the caller's address and the agent's port alone: the kernel hands one
    // ephemeral port to a pod's connections to both listeners, and one record would overwrite
    // the other (a connection then served as the other's Service).
    let shared = |client_first: Endpoint, listen: Endpoint| {
        client_first.is_set() && client_first.port == listen.port
    };
    if shared(config.client_first_v4, config.listen_v4)
        || shared(config.client_first_v6, config.listen_v6)
    {
        return invalid(
            "the listener for ports whose clients speak first has the port of the listener for any \
             port: give it another port"
                .into(),
        );
    }
    Ok((config, slots))
}

/// Takes a map out of the object, typed (aya checks key and value sizes).
fn typed_map<T>(ebpf: &mut aya::Ebpf, name: &str) -> Result<T, RedirectError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    typed(ebpf.take_map(name), name)
}

/// `map`, typed; `None` (the object has no such map) is an error.
fn typed<T>(map: Option<Map>, name: &str) -> Result<T, RedirectError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = map.ok_or_else(|| RedirectError::ObjectMismatch {
        name: name.to_owned(),
    })?;
    T::try_from(map).map_err(|_| RedirectError::ObjectMismatch {
        name: format!("{name} (unexpected type or layout)"),
    })
}

/// A descriptor of the object's map `name` of its own (for a successor).
fn dup_map_fd(ebpf: &aya::Ebpf, name: &str) -> Result<OwnedFd, RedirectError> {
    let data = match ebpf.map(name) {
        Some(
            Map::HashMap(data)
            | Map::Array(data)
            | Map::LruHashMap(data)
            | Map::PerCpuArray(data)
            | Map::SockHash(data)
            | Map::SockMap(data)
            | Map::SkStorage(data),
        ) => data,
        _ => {
            return Err(RedirectError::ObjectMismatch {
                name: name.to_owned(),
            })
        }
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| RedirectError::io(format!("duplicating the descriptor of {name}"), e))
}

/// `CALLERS` is read with a raw lookup-and-delete, so its layout is checked here instead of by aya.
fn callers_map(map: Option<Map>) -> Result<MapData, RedirectError> {
    let mismatch = || RedirectError::ObjectMismatch {
        name: format!("{} (unexpected type or layout)", maps::CALLERS),
    };
    let Some(Map::LruHashMap(data)) = map else {
        return Err(mismatch());
    };
    let info = data
        .info()
        .map_err(|e| RedirectError::kernel("reading the CALLERS map's info", e))?;
    let sizes_match = info.key_size() as usize == size_of::<CallerKey>()
        && info.value_size() as usize == size_of::<RedirectRecord>();
    if sizes_match {
        Ok(data)
    } else {
        Err(mismatch())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").unwrap()
    }

    /// A listener for any port at `addr`.
    fn any(listener: &TcpListener, addr: SocketAddr) -> AgentListener<'_> {
        AgentListener {
            listener,
            addr,
            client_first: false,
        }
    }

    #[test]
    fn redirect_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Redirect>();
    }

    #[test]
    fn config_holds_one_address_per_family() {
        let l = listener();
        let addr = l.local_addr().unwrap();
        let (config, slots) = agent_config(&[any(&l, addr)], 7).unwrap();
        assert_eq!(slots.len(), 1);
        assert_eq!(slots[0].0, LISTENER_V4);
        assert_eq!(addr::socket_addr(&config.listen_v4), addr);
        assert!(!config.listen_v6.is_set());
        assert_eq!(config.agent_cgroup_id, 7);
    }

    #[test]
    fn a_v4_mapped_agent_address_is_the_ipv4_listener() {
        let l = listener();
        let port = l.local_addr().unwrap().port();
        let addr = format!("[::ffff:10.0.0.1]:{port}").parse().unwrap();
        let (config, slots) = agent_config(&[any(&l, addr)], 0).unwrap();
        assert_eq!(slots[0].0, LISTENER_V4);
        assert_eq!(
            addr::socket_addr(&config.listen_v4),
            SocketAddr::from(([10, 0, 0, 1], port))
        );
    }

    #[test]
    fn config_rejects_what_pods_could_not_dial() {
        let l = listener();
        let port = l.local_addr().unwrap().port();
        let cases = [
            vec![],
            vec![any(&l, SocketAddr::from(([0, 0, 0, 0], port)))],
            vec![any(
                &l,
                SocketAddr::from(([10, 0, 0, 1], port.wrapping_add(1))),
            )],
            vec![any(&l, format!("[fd00::1]:{port}").parse().unwrap())],
            vec![
                any(&l, SocketAddr::from(([10, 0, 0, 1], port))),
                any(&l, SocketAddr::from(([10, 0, 0, 2], port))),
            ],
        ];
        for case in cases {
            let err = agent_config(&case, 0).unwrap_err();
            assert!(
                matches!(err, RedirectError::InvalidListener(_)),
                "{case:?}: {err}"
            );
        }
    }

    /// Ports whose clients speak first go to their own listener, in a slot of its own; one
    /// without the family's listener for any port is refused (nothing would take the others).
    #[test]
    fn a_client_first_listener_has_its_own_address_and_slot() {
        let (l, first) = (listener(), listener());
        let (addr, first_addr) = (l.local_addr().unwrap(), first.local_addr().unwrap());
        let client_first = AgentListener {
            client_first: true,
            ..any(&first, first_addr)
        };
        let (config, slots) = agent_config(&[any(&l, addr), client_first], 0).unwrap();
        assert_eq!(
            slots.iter().map(|(slot, _)| *slot).collect::<Vec<_>>(),
            [LISTENER_V4, LISTENER_CLIENT_FIRST_V4]
        );
        assert_eq!(addr::socket_addr(&config.listen_v4), addr);
        assert_eq!(addr::socket_addr(&config.client_first_v4), first_addr);
        assert!(!config.client_first_v6.is_set());
        let err = agent_config(&[client_first], 0).unwrap_err();
        assert!(matches!(err, RedirectError::InvalidListener(_)), "{err}");
    }

    /// The two listeners of a family on one port (at two addresses) would share the records'
    /// keys (the caller's address and the agent's port): refused.
    #[test]
    fn a_client_first_listener_on_the_same_port_is_refused() {
        let l = listener();
        let addr = l.local_addr().unwrap();
        let other_ip = SocketAddr::from(([127, 0, 0, 2], addr.port()));
        let first = TcpListener::bind(other_ip).unwrap();
        let client_first = AgentListener {
            client_first: true,
            ..any(&first, other_ip)
        };
        let err = agent_config(&[any(&l, addr), client_first], 0).unwrap_err();
        assert!(matches!(err, RedirectError::InvalidListener(_)), "{err}");
    }
}
