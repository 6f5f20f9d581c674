//! The few bpf(2) commands aya 0.14 does not expose: listing the programs attached to a cgroup,
//! detaching another process's link, reading a link's info from a bare descriptor (one handed
//! over by a predecessor), and an atomic lookup-and-delete; and the small map and program loads the
//! kernel feature probes (`probe.rs`) need that aya's probes do not cover.
//!
//! Attribute layouts follow `union bpf_attr` in include/uapi/linux/bpf.h; each struct covers the
//! prefix its command reads (the kernel treats missing trailing bytes as zero).

use std::{
    io,
    mem::{size_of, MaybeUninit},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
const BPF_PROG_QUERY: libc::c_int = 16;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_int = 21;
const BPF_LINK_GET_FD_BY_ID: libc::c_int = 30;
pub(crate) const BPF_LINK_CREATE: libc::c_int = 28;
pub(crate) const BPF_LINK_DETACH: libc::c_int = 34;

/// `enum bpf_attach_type` values of the hooks the redirect uses.
pub(crate) mod attach_type {
    pub(crate) const CGROUP_SOCK_OPS: u32 = 3;
    pub(crate) const CGROUP_INET4_CONNECT: u32 = 10;
    pub(crate) const CGROUP_INET6_CONNECT: u32 = 11;
    pub(crate) const CGROUP_INET4_GETPEERNAME: u32 = 29;
    pub(crate) const CGROUP_INET6_GETPEERNAME: u32 = 30;
    pub(crate) const ALL: [u32; 5] = [
        CGROUP_INET4_CONNECT,
        CGROUP_INET6_CONNECT,
        CGROUP_SOCK_OPS,
        CGROUP_INET4_GETPEERNAME,
        CGROUP_INET6_GETPEERNAME,
    ];
}

/// At most this many programs can be attached to one cgroup hook (BPF_CGROUP_MAX_PROGS).
const MAX_PROGS_PER_HOOK: usize = 64;

fn bpf<A>(cmd: libc::c_int, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly sized #[repr(C)] prefix of `union bpf_attr`; pointers inside
    // it, if any, point to buffers that outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<A>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// Ids of the programs attached directly to `cgroup` (not inherited) at `attach_type`.
pub(crate) fn cgroup_programs(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; MAX_PROGS_PER_HOOK];
    let mut attr = ProgQueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// A file descriptor for the link with this id (needs CAP_SYS_ADMIN).
pub(crate) fn link_by_id(id: u32) -> io::Result<OwnedFd> {
    let fd = bpf(
        BPF_LINK_GET_FD_BY_ID,
        &mut GetFdByIdAttr {
            id,
            ..Default::default()
        },
    )?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Detaches a link from its hook, whoever holds it; the link object lives on, inert, until its
/// last holder closes it.
pub(crate) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    bpf(
        BPF_LINK_DETACH,
        &mut LinkDetachAttr {
            link_fd: link.as_raw_fd() as u32,
        },
    )?;
    Ok(())
}

#[repr(C)]
struct GetInfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `BPF_LINK_TYPE_CGROUP`: a program attached to a cgroup through a link.
pub(crate) const LINK_TYPE_CGROUP: u32 = 3;

/// The head of `struct bpf_link_info`: what kind of link, its id, its program's id.
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct LinkInfo {
    pub(crate) link_type: u32,
    pub(crate) id: u32,
    pub(crate) prog_id: u32,
    _pad: u32,
}

/// The info of the bpf link behind `link`; fails (EINVAL) when it is not a link.
pub(crate) fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = LinkInfo::default();
    // A prefix of the kernel's struct is allowed: it copies min(its size, info_len) bytes.
    let mut attr = GetInfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<LinkInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Reads and removes `key` in one step (hash and LRU hash maps, kernel 5.14+), so no two callers
/// can take the same entry; `None` if absent.
pub(crate) fn map_take<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = MaybeUninit::<V>::uninit();
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        // SAFETY: on success the kernel wrote value_size == size_of::<V>() bytes (aya checked the
        // map's value size against V when the map was typed; see `Redirect::attach`).
        Ok(_) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// A new map of `map_type` (`enum bpf_map_type`) with `u32` keys and values and one entry.
pub(crate) fn small_map(map_type: u32) -> io::Result<OwnedFd> {
    let fd = bpf(
        BPF_MAP_CREATE,
        &mut MapCreateAttr {
            map_type,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            ..Default::default()
        },
    )?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Loads `r0 = 1; exit` as a program of `prog_type` for the hook `expected_attach_type`: whether
/// the kernel knows that hook for that program type (EINVAL when it does not).
pub(crate) fn load_trivial_program(prog_type: u32, expected_attach_type: u32) -> io::Result<()> {
    // BPF_ALU64 | BPF_MOV | BPF_K into r0, imm 1; then BPF_JMP | BPF_EXIT.
    let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x95];
    let license = c"GPL";
    let fd = bpf(
        BPF_PROG_LOAD,
        &mut ProgLoadAttr {
            prog_type,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            expected_attach_type,
            ..Default::default()
        },
    )?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns; closing it unloads
    // the probe program.
    drop(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) });
    Ok(())
}

/// Whether the kernel knows the bpf(2) command `cmd`, called with `attr` whose descriptors are
/// invalid (-1): a known command fails with EBADF when it reads them, an unknown one with EINVAL.
pub(crate) fn command_known(cmd: libc::c_int, mut attr: [u32; 4]) -> io::Result<bool> {
    match bpf(cmd, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
        Ok(_) => Ok(true),
    }
}
