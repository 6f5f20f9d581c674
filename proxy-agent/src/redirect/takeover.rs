//! Taking the kernel redirect over from a running agent: the redirect's half of a hitless restart
//! (the protocol and the listeners are `crate::handover`'s).
//!
//! The running agent hands over descriptors of its bpf links and of the maps a successor adopts
//! (`MESH_SERVICES`, `LOCAL_PODS`, `CONFIG`, `CALLERS`, `COUNTERS`, `LOCAL_SOCKETS`, whose sk_msg
//! program stays attached only while a process holds it, and `LOCAL_SEND`, which tells which of
//! the sockets it hands over may be paired); its redirect listener travels with the other
//! listeners and is the very socket its `AGENT_LISTENERS` holds. A link stays attached while any process
//! holds a descriptor of it, and a map lives while a program or a descriptor uses it, so the
//! predecessor exiting removes nothing the successor holds. Two ways on from there:
//!
//! - **Same programs** (equal [`object_digest`], the usual restart): the successor adopts the links
//!   and maps as they are. Nothing changes in the kernel but `CONFIG` (the exempt cgroup, and
//!   whether local sockets pair) and what the successor's first table puts in the sets:
//!   connections steered before, during and after the takeover find their record in the one
//!   `CALLERS`, whichever agent accepts them.
//! - **Different programs** (an upgrade that changed them, or `fresh_programs`): the successor
//!   loads its own object with fresh maps pointed at the same listener, and, once the predecessor
//!   has stopped accepting ([`Redirect::complete_takeover`]), attaches its programs and only then
//!   detaches the predecessor's connect programs. At every instant a connect program steers: during
//!   the overlap the predecessor's runs first (a cgroup runs its programs in attach order) and
//!   ours sees the agent's address, not a mesh Service, and passes. Records of connections the
//!   predecessor's programs steered are in its `CALLERS`, which the successor reads after its own;
//!   its sockops and getpeername programs stay attached until the successor exits, so that a
//!   connection still in its handshake gets its record and getpeername keeps showing the VIP on
//!   the connections they steered.
//!
//! Nothing is attached to the cgroup or detached before [`Redirect::complete_takeover`] (the
//! successor's own sk_msg program goes on its own fresh `LOCAL_SOCKETS`, which no socket joins
//! before its programs are attached): a successor that fails before it (say its programs do not
//! load) leaves the predecessor exactly as it was.

use std::{
    collections::HashSet,
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    sync::{atomic::AtomicBool, Mutex},
};

use aya::maps::{Map, MapData};
use proxy_common::maps;
use serde::{Deserialize, Serialize};

use super::{
    addr, agent_config, attach, attach::OwnedLink, callers_map, cgroup, object, own_cgroup_id,
    read_agent_config, sets::KernelMap, typed, write_agent_config, AgentListener, Listening,
    PairRecords, Programs, Redirect, RedirectError, OPTIONAL_SHARED_MAPS, PAIR_RECORDS,
};

/// What a running agent tells its successor about its redirect; the descriptors follow in this
/// order: `maps`, then `links`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectOffer {
    /// The cgroup the programs are attached to (its id).
    pub cgroup_id: u64,
    /// The addresses pods are sent to, of the listeners for any port.
    pub listen: Vec<SocketAddr>,
    /// The addresses of the listeners for ports whose clients speak first (`AgentListener`).
    /// Apart from `listen` so that an agent older than them, which asks for `listen` to be its
    /// own listeners, can take over (and swaps its programs in: its `CONFIG` has no such
    /// listeners). Absent from such agents.
    #[serde(default)]
    pub client_first: Vec<SocketAddr>,
    /// [`object_digest`] of the programs attached.
    pub object_digest: String,
    /// Map names (`proxy_common::maps`), one per map descriptor.
    pub maps: Vec<String>,
    /// Program names (`proxy_common::programs`), one per link descriptor.
    pub links: Vec<String>,
    /// Whether its sockets may be paired (`Redirect::sockets_may_be_paired`): then the successor
    /// splices none of the connections it takes over, nor those accepted during the overlap,
    /// unless the records handed over (`LOCAL_SEND`) say the socket never joined. Sticky down a
    /// chain of takeovers (handed-over connections live on) until a cold start. Absent from older
    /// agents, which never paired any.
    #[serde(default)]
    pub local_sockets: bool,
}

impl RedirectOffer {
    /// How many descriptors come with this offer.
    pub fn fd_count(&self) -> usize {
        self.maps.len() + self.links.len()
    }
}

/// A running agent's redirect, received: what a successor takes over.
#[derive(Debug)]
pub struct Predecessor {
    offer: RedirectOffer,
    maps: Vec<(String, OwnedFd)>,
    links: Vec<OwnedLink>,
}

impl Predecessor {
    /// The redirect of `offer` with its descriptors (as many as [`RedirectOffer::fd_count`], in
    /// its order). Checks that each link descriptor is a cgroup link.
    pub fn new(offer: RedirectOffer, fds: Vec<OwnedFd>) -> Result<Self, RedirectError> {
        if fds.len() != offer.fd_count() {
            return Err(RedirectError::InvalidTakeover(format!(
                "{} descriptors came with an offer of {} maps and {} links",
                fds.len(),
                offer.maps.len(),
                offer.links.len()
            )));
        }
        let mut fds = fds.into_iter();
        let maps = offer.maps.iter().cloned().zip(fds.by_ref()).collect();
        let links = offer
            .links
            .iter()
            .cloned()
            .zip(fds)
            .map(|(program, fd)| OwnedLink::from_fd(program, fd))
            .collect::<Result<_, _>>()?;
        Ok(Self { offer, maps, links })
    }

    pub fn offer(&self) -> &RedirectOffer {
        &self.offer
    }

    /// The predecessor's map `name`, as aya's map (its own descriptor; the original stays here).
    fn map(&self, name: &str) -> Result<Map, RedirectError> {
        let (_, fd) = self.maps.iter().find(|(n, _)| n == name).ok_or_else(|| {
            RedirectError::InvalidTakeover(format!("the running agent did not hand over {name}"))
        })?;
        let fd = fd
            .try_clone()
            .map_err(|e| RedirectError::io(format!("duplicating the descriptor of {name}"), e))?;
        let data = MapData::from_fd(fd)
            .map_err(|e| RedirectError::kernel(format!("opening the map {name} handed over"), e))?;
        Map::from_map_data(data)
            .map_err(|e| RedirectError::kernel(format!("reading the map {name} handed over"), e))
    }

    /// The predecessor's map `name`, typed.
    fn typed_map<T>(&self, name: &str) -> Result<T, RedirectError>
    where
        T: TryFrom<Map, Error = aya::maps::MapError>,
    {
        typed(Some(self.map(name)?), name)
    }

    /// The descriptors of the maps a successor adopts, in `Redirect::shared_maps` form: every one
    /// of the [`SHARED_MAPS`](super::SHARED_MAPS), and those of the [`OPTIONAL_SHARED_MAPS`]
    /// handed over.
    fn shared_maps(&mut self) -> Result<Vec<(&'static str, OwnedFd)>, RedirectError> {
        let mut shared = Vec::with_capacity(super::SHARED_MAPS.len() + OPTIONAL_SHARED_MAPS.len());
        for name in super::SHARED_MAPS {
            let fd = self.take(name).ok_or_else(|| {
                RedirectError::InvalidTakeover(format!(
                    "the running agent did not hand over {name}"
                ))
            })?;
            shared.push((name, fd));
        }
        for name in OPTIONAL_SHARED_MAPS {
            shared.extend(self.take(name).map(|fd| (name, fd)));
        }
        Ok(shared)
    }

    fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let index = self.maps.iter().position(|(n, _)| n == name)?;
        Some(self.maps.swap_remove(index).1)
    }

    /// Where the predecessor's programs record the sockets that joined the pairs; `None` from an
    /// agent older than these records, or one whose records this agent cannot read (another
    /// version's layout): only their presence is asked, and without them any socket its programs
    /// paired may be, which is safe; not a reason to refuse the takeover.
    fn pair_records(&self) -> Option<PairRecords> {
        if !self.maps.iter().any(|(n, _)| n == PAIR_RECORDS) {
            return None;
        }
        self.typed_map(PAIR_RECORDS)
            .map_err(|e| {
                tracing::warn!(error = %e, "the running agent's socket pair records are not readable by this agent: every socket its programs paired is taken as paired")
            })
            .ok()
    }
}

/// How a successor took the redirect over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeoverKind {
    /// The predecessor's programs and maps, kept as they were.
    Adopted,
    /// Our own programs, swapped in.
    Swapped,
}

/// The canonical addresses of `listeners` of one kind (`client_first` or for any port).
pub(super) fn addresses(listeners: &[AgentListener<'_>], client_first: bool) -> Vec<SocketAddr> {
    listeners
        .iter()
        .filter(|l| l.client_first == client_first)
        .map(|l| addr::canonical(l.addr))
        .collect()
}

/// Whether this agent, with listeners at `listen` and `client_first`, adopts the programs of a
/// predecessor that made `offer` (`false`: it swaps its own in). Refused when one of the
/// predecessor's listeners for any port is not ours: pods connecting meanwhile would reach no
/// one. Its programs are adopted only if they are this binary's and steer to the same listeners
/// (they steer as its `CONFIG` says); a different client-first one (an agent older than them has
/// none), or one for any port of a family it had none for (a node made dual-stack), and this
/// agent's programs are swapped in to steer to its own. So are they when it did not hand over
/// their listener map (an agent older than it): without it, this agent could not open the
/// listeners of a family whose first ClusterIP comes later (`Redirect::add_listeners`).
fn adopts(
    listen: &[SocketAddr],
    client_first: &[SocketAddr],
    offer: &RedirectOffer,
    fresh_programs: bool,
) -> Result<bool, RedirectError> {
    let set = |addrs: &[SocketAddr]| -> HashSet<SocketAddr> {
        addrs.iter().map(|a| addr::canonical(*a)).collect()
    };
    let (ours, theirs) = (set(listen), set(&offer.listen));
    if !theirs.is_subset(&ours) {
        return Err(RedirectError::InvalidTakeover(format!(
            "it sends pods to {:?}, this agent is configured for {listen:?}",
            offer.listen
        )));
    }
    Ok(!fresh_programs
        && offer.object_digest == object::object_digest()
        && offer.maps.iter().any(|m| m == maps::AGENT_LISTENERS)
        && ours == theirs
        && set(client_first) == set(&offer.client_first))
}

impl Redirect {
    /// Takes the redirect of a running agent over (see the module comment). `listeners` are this
    /// agent's, which must be the ones handed over (same addresses); `cgroup` must be the
    /// predecessor's. With `fresh_programs`, this binary's programs are swapped in even when they
    /// are the predecessor's. Nothing changes on the cgroup until [`Self::complete_takeover`].
    pub fn take_over(
        cgroup: &Path,
        listeners: &[AgentListener<'_>],
        mut predecessor: Predecessor,
        fresh_programs: bool,
    ) -> Result<Self, RedirectError> {
        // Also when adopting: a predecessor that attached without probing (an older version) may
        // be steering into records this agent cannot read. Refusing drops our copies of its links;
        // they detach when it exits (fail open).
        super::check_kernel()?;
        let cgroup_id = cgroup::cgroup_id(cgroup)?;
        let offer = predecessor.offer.clone();
        if cgroup_id != offer.cgroup_id {
            return Err(RedirectError::InvalidTakeover(format!(
                "its programs are attached to another cgroup (id {}) than --cgroup {} (id {cgroup_id})",
                offer.cgroup_id,
                cgroup.display()
            )));
        }
        let (listen, client_first) = (addresses(listeners, false), addresses(listeners, true));
        let redirect = if adopts(&listen, &client_first, &offer, fresh_programs)? {
            let services = KernelMap::mesh_services(predecessor.typed_map(maps::MESH_SERVICES)?);
            let local_pods = KernelMap::local_pods(predecessor.typed_map(maps::LOCAL_PODS)?);
            let config = predecessor.typed_map(maps::CONFIG)?;
            let callers = callers_map(Some(predecessor.map(maps::CALLERS)?))?;
            let counters = predecessor.typed_map(maps::COUNTERS)?;
            // Its programs are ours now: without their records, any socket may be paired.
            let pair_records = predecessor.pair_records().map(|theirs| vec![theirs]);
            // Handed over, or `adopts` would have said no.
            let listener_slots = Mutex::new(predecessor.typed_map(maps::AGENT_LISTENERS)?);
            // The same listeners; what changes is the exempt cgroup: ours (on Kubernetes a
            // successor is a new pod, in a cgroup of its own). Pairing stays as the running agent
            // set it until this one says otherwise (`Redirect::set_local_sockets`): no moment
            // without it while both run. Written at Stop (`Redirect::config_at_takeover`).
            let (mut value, _) = agent_config(listeners, own_cgroup_id()?)?;
            value.local_sockets = read_agent_config(&config)?.local_sockets;
            Self {
                cgroup: cgroup.to_owned(),
                cgroup_id,
                listening: Listening::of(listeners),
                listener_slots,
                services: Mutex::new(services),
                without_listener: Default::default(),
                table_version: Default::default(),
                local_pods: Mutex::new(local_pods),
                config: Mutex::new(config),
                config_at_takeover: Mutex::new(Some(value)),
                callers,
                counters,
                predecessor_callers: None,
                shared_maps: predecessor.shared_maps()?,
                paired_sockets: AtomicBool::new(offer.local_sockets),
                pair_records,
                programs: Mutex::new(Programs {
                    links: std::mem::take(&mut predecessor.links),
                    predecessor: Vec::new(),
                    pending: None,
                    swap_failed: false,
                    _object: None,
                }),
            }
        } else {
            let loaded = Self::load(listeners)?;
            let predecessor_callers = callers_map(Some(predecessor.map(maps::CALLERS)?))?;
            // The sockets its programs paired (the connections it hands over among them) are in
            // its records; without them, any may be.
            let pair_records = match predecessor.pair_records() {
                Some(theirs) => Some(vec![loaded.pair_records, theirs]),
                None if offer.local_sockets => None,
                None => Some(vec![loaded.pair_records]),
            };
            Self {
                cgroup: cgroup.to_owned(),
                cgroup_id,
                listening: Listening::of(listeners),
                listener_slots: Mutex::new(loaded.listener_slots),
                services: Mutex::new(loaded.services),
                without_listener: Default::default(),
                table_version: Default::default(),
                local_pods: Mutex::new(loaded.local_pods),
                config: Mutex::new(loaded.config),
                config_at_takeover: Mutex::default(),
                callers: loaded.callers,
                counters: loaded.counters,
                predecessor_callers: Some(predecessor_callers),
                shared_maps: loaded.shared_maps,
                paired_sockets: AtomicBool::new(offer.local_sockets),
                pair_records,
                programs: Mutex::new(Programs {
                    links: Vec::new(),
                    predecessor: std::mem::take(&mut predecessor.links),
                    pending: Some(loaded.ebpf),
                    swap_failed: false,
                    _object: None,
                }),
            }
        };
        Ok(redirect)
    }

    /// Finishes a takeover once the predecessor has stopped accepting: with programs of our own,
    /// attaches them, then detaches the predecessor's connect programs (see the module comment).
    /// Adopted programs need nothing. Idempotent.
    ///
    /// On an error, the predecessor's programs keep steering (into the listener this agent serves,
    /// with records this agent reads), so the agent can go on serving; whatever of ours got
    /// attached is detached again.
    pub fn complete_takeover(&self) -> Result<TakeoverKind, RedirectError> {
        let mut deferred = self
            .config_at_takeover
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(value) = *deferred {
            write_agent_config(
                &mut self
                    .config
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                value,
            )?;
            // Written: later changes go to the programs.
            *deferred = None;
        }
        drop(deferred);
        let mut programs = self
            .programs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(ebpf) = programs.pending.take() else {
            return Ok(if self.predecessor_callers.is_some() {
                TakeoverKind::Swapped
            } else {
                TakeoverKind::Adopted
            });
        };
        let swapped = self.swap(&mut programs, ebpf);
        programs.swap_failed = swapped.is_err();
        swapped.map(|()| TakeoverKind::Swapped)
    }

    fn swap(&self, programs: &mut Programs, mut ebpf: aya::Ebpf) -> Result<(), RedirectError> {
        let cgroup_file = attach::open_cgroup(&self.cgroup)?;
        let links = attach::attach_all(&mut ebpf, &cgroup_file)?;
        programs._object = Some(ebpf);
        programs.links = links;
        // Ours run now: only from here on may the predecessor's connect programs go.
        for link in programs.predecessor.iter().filter(|l| l.steers()) {
            link.detach()?;
        }
        programs.predecessor.retain(|l| !l.steers());
        // Leftovers of any other agent (not ours, not the predecessor's kept observers).
        let keep: HashSet<u32> = programs
            .links
            .iter()
            .chain(&programs.predecessor)
            .map(|l| l.program_id)
            .collect();
        attach::detach_others(&cgroup_file, &keep)?;
        Ok(())
    }

    /// What to hand a successor, and the descriptors (in the offer's order), duplicated: this
    /// agent keeps its own until it exits.
    pub fn offer(&self) -> Result<(RedirectOffer, Vec<OwnedFd>), RedirectError> {
        let programs = self
            .programs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if programs.pending.is_some() {
            return Err(RedirectError::InvalidTakeover(
                "this agent has not finished taking over from its own predecessor yet; try again \
                 in a moment"
                    .into(),
            ));
        }
        if programs.swap_failed {
            return Err(RedirectError::InvalidTakeover(
                "this agent could not swap its programs in when it took over, so its \
                 predecessor's may still steer; restart it without a takeover"
                    .into(),
            ));
        }
        let dup = |what: &str, fd: &OwnedFd| {
            fd.as_fd()
                .try_clone_to_owned()
                .map_err(|e| RedirectError::io(format!("duplicating the descriptor of {what}"), e))
        };
        let mut fds = Vec::with_capacity(self.shared_maps.len() + programs.links.len());
        for (name, fd) in &self.shared_maps {
            fds.push(dup(name, fd)?);
        }
        for link in &programs.links {
            fds.push(dup(&link.program, &link.fd)?);
        }
        let listening = self.listening();
        let offer = RedirectOffer {
            cgroup_id: self.cgroup_id,
            listen: listening.listen.clone(),
            client_first: listening.client_first.clone(),
            object_digest: object::object_digest(),
            maps: self
                .shared_maps
                .iter()
                .map(|(n, _)| (*n).to_owned())
                .collect(),
            links: programs.links.iter().map(|l| l.program.clone()).collect(),
            local_sockets: self.sockets_may_be_paired(),
        };
        Ok((offer, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(listen: &[&str], client_first: &[&str], digest: String) -> RedirectOffer {
        let addrs = |a: &[&str]| a.iter().map(|a| a.parse().unwrap()).collect();
        RedirectOffer {
            cgroup_id: 1,
            listen: addrs(listen),
            client_first: addrs(client_first),
            object_digest: digest,
            maps: vec![maps::AGENT_LISTENERS.to_owned()],
            links: Vec::new(),
            local_sockets: false,
        }
    }

    /// An agent older than client-first listeners offers only its one listener: taken over by
    /// swapping programs in, as one with another client-first listener is, or one that did not
    /// hand over the listener map; the same programs and listeners are adopted; other listeners
    /// for any port are refused.
    #[test]
    fn which_predecessors_are_adopted_swapped_or_refused() {
        let client_first: [SocketAddr; 1] = ["10.0.0.1:15002".parse().unwrap()];
        let adopts_with = |listen: &[SocketAddr], offer: &RedirectOffer, fresh: bool| {
            adopts(listen, &client_first, offer, fresh).map_err(|e| e.to_string())
        };
        let ipv4_only: [SocketAddr; 1] = ["10.0.0.1:15001".parse().unwrap()];
        let adopts = |offer: RedirectOffer, fresh: bool| adopts_with(&ipv4_only, &offer, fresh);
        let same = object::object_digest();
        let any = "10.0.0.1:15001";
        assert_eq!(
            adopts(offer(&[any], &["10.0.0.1:15002"], same.clone()), false),
            Ok(true)
        );
        assert_eq!(
            adopts(offer(&[any], &["10.0.0.1:15002"], same.clone()), true),
            Ok(false)
        );
        assert_eq!(adopts(offer(&[any], &[], "older".into()), false), Ok(false));
        assert_eq!(
            adopts(offer(&[any], &["10.0.0.1:15100"], same.clone()), false),
            Ok(false)
        );
        assert!(adopts(offer(&["10.0.0.2:15001"], &[], same.clone()), false).is_err());
        assert!(adopts(offer(&[any, "10.0.0.1:15002"], &[], same.clone()), false).is_err());
        // A node made dual-stack: ours steer IPv6 ClusterIPs too; fewer listeners are refused.
        let dual: [SocketAddr; 2] = [any.parse().unwrap(), "[fd00::1]:15001".parse().unwrap()];
        let just_v4 = offer(&[any], &["10.0.0.1:15002"], same.clone());
        assert_eq!(adopts_with(&dual, &just_v4, false), Ok(false));
        let dual_offer = offer(&[any, "[fd00::1]:15001"], &["10.0.0.1:15002"], same);
        assert_eq!(adopts_with(&dual, &dual_offer, false), Ok(true));
        assert!(
            adopts(dual_offer, false).is_err(),
            "a rollback to IPv4 only"
        );
        // Programs of an agent that did not hand over their listener map: ours are swapped in.
        let mut without_listener_map = offer(&[any], &["10.0.0.1:15002"], object::object_digest());
        without_listener_map.maps.clear();
        assert_eq!(adopts(without_listener_map, false), Ok(false));
        // What an older agent sends and reads: the field absent.
        let older: RedirectOffer = serde_json::from_str(
            r#"{"cgroup_id":1,"listen":["10.0.0.1:15001"],"object_digest":"x","maps":[],"links":[]}"#,
        )
        .unwrap();
        assert!(older.client_first.is_empty());
    }
}
