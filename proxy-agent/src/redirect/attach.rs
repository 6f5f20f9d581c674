//! Attaching the programs to the pods' cgroup, and making sure each is attached exactly once.
//!
//! Programs are attached through bpf_links. The kernel makes every link-based cgroup attachment
//! multi-attach (and rejects explicit flags: aya's `CgroupAttachMode::Single` passes none). That
//! coexists with other tools' programs on the same cgroup (a CNI's socket load balancer, say), but
//! lets two agents attach side by side; so after attaching, the programs a predecessor left on this
//! cgroup (recognised by the `gamma_` name prefix) are detached. Attaching first and detaching
//! second leaves no instant without a connect program: meanwhile both run, the predecessor's first
//! (a cgroup runs its programs in attach order), and a connection it steered is served by whichever
//! listener it named. Unpinned links die with their process, so after a crash there is nothing to
//! clean; a predecessor still running (an overlapping start without a takeover) loses its programs
//! to the newcomer and keeps serving the connections it already accepted.
//!
//! The links are kept as plain file descriptors ([`OwnedLink`]): a link lives while any process
//! holds a descriptor of it, which is what lets a successor take them over (`takeover.rs`).

use std::{
    collections::HashSet,
    fs::File,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
};

use aya::{
    programs::{links::FdLink, loaded_links, loaded_programs, CgroupAttachMode, Program},
    Ebpf,
};
use proxy_common::programs;

use super::{
    bpf_sys::{self, attach_type},
    cgroup, RedirectError,
};

/// A bpf_link of one of our programs on the cgroup. Dropping the last descriptor of a link (in any
/// process) detaches it.
#[derive(Debug)]
pub(crate) struct OwnedLink {
    /// The program's name (`proxy_common::programs`).
    pub(crate) program: String,
    /// The kernel's id of the program, to tell ours from a predecessor's.
    pub(crate) program_id: u32,
    pub(crate) fd: OwnedFd,
}

impl OwnedLink {
    /// A link received from a predecessor, after checking with the kernel that it is a link and
    /// reading which program it runs.
    pub(crate) fn from_fd(program: String, fd: OwnedFd) -> Result<Self, RedirectError> {
        let info = bpf_sys::link_info(fd.as_fd()).map_err(|e| {
            RedirectError::io(format!("reading the bpf link of {program} handed over"), e)
        })?;
        if info.link_type != bpf_sys::LINK_TYPE_CGROUP {
            return Err(RedirectError::InvalidTakeover(format!(
                "the descriptor handed over for {program} is not a cgroup bpf link (type {})",
                info.link_type
            )));
        }
        Ok(Self {
            program,
            program_id: info.prog_id,
            fd,
        })
    }

    /// Whether this is a connect program's link: the programs that decide where connections go.
    pub(crate) fn steers(&self) -> bool {
        self.program == programs::CONNECT4 || self.program == programs::CONNECT6
    }

    /// Detaches the link from the cgroup now, whoever else holds it.
    pub(crate) fn detach(&self) -> Result<(), RedirectError> {
        bpf_sys::link_detach(self.fd.as_fd())
            .map_err(|e| RedirectError::io(format!("detaching the link of {}", self.program), e))
    }
}

/// Observers first (sockops, getpeername), then the connect hooks: once a connect() is redirected,
/// the programs that record and report it are already in place.
pub(crate) const ATTACH_ORDER: [&str; 5] = [
    programs::SOCKOPS,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::CONNECT4,
    programs::CONNECT6,
];

/// Opens `dir` as an attach target, after checking it is a cgroup v2 directory.
pub(crate) fn open_cgroup(dir: &Path) -> Result<File, RedirectError> {
    cgroup::cgroup_id(dir)?;
    File::open(dir).map_err(|e| RedirectError::io(format!("opening {}", dir.display()), e))
}

/// Attaches every program of `ebpf` (loaded already, see `object::load_all`) to `cgroup`. The links
/// are returned, owned by the caller.
pub(crate) fn attach_all(ebpf: &mut Ebpf, cgroup: &File) -> Result<Vec<OwnedLink>, RedirectError> {
    let mut links = Vec::with_capacity(ATTACH_ORDER.len());
    for name in ATTACH_ORDER {
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| RedirectError::ObjectMismatch {
                name: name.to_owned(),
            })?;
        let fd_link = match program {
            Program::CgroupSockAddr(p) => p
                .attach(cgroup, CgroupAttachMode::Single)
                .and_then(|id| p.take_link(id))
                .map(FdLink::try_from),
            Program::SockOps(p) => p
                .attach(cgroup, CgroupAttachMode::Single)
                .and_then(|id| p.take_link(id))
                .map(FdLink::try_from),
            _ => unreachable!("load_program accepts only these two types"),
        }
        .map_err(|e| RedirectError::kernel(format!("attaching {name} to the cgroup"), e))?
        .map_err(|e| RedirectError::kernel(format!("taking the link of {name}"), e))?;
        let info = fd_link
            .info()
            .map_err(|e| RedirectError::kernel(format!("reading the link of {name}"), e))?;
        // aya keeps no copy once the link is taken; a descriptor of our own (by id) replaces its
        // handle, so that all links, ours and inherited ones, are plain descriptors.
        let fd = bpf_sys::link_by_id(info.id())
            .map_err(|e| RedirectError::io(format!("opening the link of {name}"), e))?;
        links.push(OwnedLink {
            program: name.to_owned(),
            program_id: info.program_id(),
            fd,
        });
    }
    Ok(links)
}

/// Detaches the gamma programs attached to `cgroup` other than those in `keep` (program ids):
/// what an earlier agent left. Returns how many links were detached.
pub(crate) fn detach_others(cgroup: &File, keep: &HashSet<u32>) -> Result<usize, RedirectError> {
    let stale_ids: HashSet<u32> = gamma_programs(cgroup)?
        .iter()
        .map(|p| p.id)
        .filter(|id| !keep.contains(id))
        .collect();
    if stale_ids.is_empty() {
        return Ok(0);
    }
    let mut detached = 0;
    for link in loaded_links().filter_map(Result::ok) {
        if !stale_ids.contains(&link.program_id()) {
            continue;
        }
        let fd = match bpf_sys::link_by_id(link.id()) {
            Ok(fd) => fd,
            // Closed by its owner since the listing: nothing left to detach.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => {
                return Err(RedirectError::io(
                    format!("opening bpf link {}", link.id()),
                    e,
                ))
            }
        };
        bpf_sys::link_detach(fd.as_fd())
            .map_err(|e| RedirectError::io(format!("detaching bpf link {}", link.id()), e))?;
        detached += 1;
    }
    let left: Vec<AttachedProgram> = gamma_programs(cgroup)?
        .into_iter()
        .filter(|p| !keep.contains(&p.id))
        .collect();
    if let Some(p) = left.first() {
        // Attached with BPF_PROG_ATTACH (no link): only a detach naming the program removes it.
        return Err(RedirectError::Kernel {
            action: format!(
                "removing {} stale gamma program(s) from the cgroup; detach them by hand, e.g. \
                 `bpftool cgroup detach <cgroup> <attach type> id {}`",
                left.len(),
                p.id
            ),
            source: "attached without a bpf_link".into(),
        });
    }
    Ok(detached)
}

/// A gamma program attached directly to a cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedProgram {
    pub id: u32,
    pub name: String,
}

/// The gamma programs attached directly to the cgroup `dir`, one entry per attachment: after a
/// successful [`super::Redirect::attach`], each program of the object exactly once.
pub fn attached_programs(dir: &Path) -> Result<Vec<AttachedProgram>, RedirectError> {
    gamma_programs(&open_cgroup(dir)?)
}

fn gamma_programs(cgroup: &File) -> Result<Vec<AttachedProgram>, RedirectError> {
    let mut ids = Vec::new();
    for attach_type in attach_type::ALL {
        ids.extend(
            bpf_sys::cgroup_programs(cgroup.as_fd(), attach_type)
                .map_err(|e| RedirectError::io("listing the programs attached to the cgroup", e))?,
        );
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let names: std::collections::HashMap<u32, String> = loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| Some((p.id(), p.name_as_str()?.to_owned())))
        .collect();
    Ok(ids
        .into_iter()
        .filter_map(|id| {
            let name = names.get(&id)?;
            name.starts_with(programs::PREFIX).then(|| AttachedProgram {
                id,
                name: name.clone(),
            })
        })
        .collect())
}
