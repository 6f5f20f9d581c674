//! Attaching the programs to the pods' cgroup, and making sure each is attached exactly once.
//!
//! Programs are attached through bpf_links owned by this process. The kernel makes every link-based
//! cgroup attachment multi-attach (and rejects explicit flags: aya's `CgroupAttachMode::Single`
//! passes none). That coexists with other tools' programs on the same cgroup (a CNI's socket load
//! balancer, say), but lets two agents attach side by side; so before attaching, the programs a predecessor left on
//! this cgroup (recognised by the `gamma_` name prefix) are detached. Unpinned links die with
//! their process, so after a crash there is nothing to clean; a predecessor still running (an
//! overlapping upgrade) loses its programs to the newcomer and keeps serving the connections it
//! already accepted.

use std::{collections::HashSet, fs::File, os::fd::AsFd as _, path::Path};

use aya::{
    programs::{loaded_links, loaded_programs, CgroupAttachMode, Program},
    Ebpf,
};
use proxy_common::programs;

use super::{
    bpf_sys::{self, attach_type},
    cgroup,
    object::load_program,
    RedirectError,
};

/// Observers first (sockops, getpeername), then the connect hooks: once a connect() is redirected,
/// the programs that record and report it are already in place.
const ATTACH_ORDER: [&str; 5] = [
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

/// Loads and attaches every program to `cgroup`. The links belong to `ebpf`: dropping it detaches.
pub(crate) fn attach_all(ebpf: &mut Ebpf, cgroup: &File) -> Result<(), RedirectError> {
    for name in ATTACH_ORDER {
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| RedirectError::ObjectMismatch {
                name: name.to_owned(),
            })?;
        load_program(name, program)?;
        let attached = match program {
            Program::CgroupSockAddr(p) => p.attach(cgroup, CgroupAttachMode::Single).map(drop),
            Program::SockOps(p) => p.attach(cgroup, CgroupAttachMode::Single).map(drop),
            _ => unreachable!("load_program accepts only these two types"),
        };
        attached
            .map_err(|e| RedirectError::kernel(format!("attaching {name} to the cgroup"), e))?;
    }
    Ok(())
}

/// Detaches the gamma programs attached to `cgroup` (by an earlier agent). Returns how many.
pub(crate) fn detach_predecessors(cgroup: &File) -> Result<usize, RedirectError> {
    let stale = gamma_programs(cgroup)?;
    if stale.is_empty() {
        return Ok(0);
    }
    let stale_ids: HashSet<u32> = stale.iter().map(|p| p.id).collect();
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
    let left = gamma_programs(cgroup)?;
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
