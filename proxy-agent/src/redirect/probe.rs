//! What the redirect needs from the kernel, probed before anything is attached.
//!
//! A kernel that loads and attaches every program can still lack an operation the agent needs
//! afterwards: on Linux 5.10 the verifier accepts all of them, the connect programs steer pods'
//! connections to the agent, and then reading each connection's record (lookup-and-delete on the
//! LRU map, 5.14) fails, so every steered connection is closed. Probing every feature first lets
//! the agent refuse instead: nothing attached, pods keep ordinary Service routing.
//!
//! `since` is the first mainline release known to bring a feature; the agent's programs are
//! verified on the kernels the README names.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};

use super::{
    bpf_sys::{self, attach_type},
    RedirectError,
};

/// A kernel capability the redirect relies on, and the Linux release that brings it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelFeature {
    pub name: &'static str,
    pub since: &'static str,
}

/// The kernel lacks features the redirect needs; nothing was attached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the kernel redirect cannot work on this kernel (Linux {running}): it lacks {}. Nothing was \
     attached: pods on this node reach Services through ordinary Service routing, without mesh \
     routes. Run this node on Linux {} or later to have the mesh here",
    list(missing),
    newest_since(missing)
)]
pub struct MissingKernelFeatures {
    pub missing: Vec<KernelFeature>,
    /// `uname -r` of the running kernel.
    pub running: String,
}

fn list(missing: &[KernelFeature]) -> String {
    missing
        .iter()
        .map(|f| format!("{} (Linux {})", f.name, f.since))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The release that brings every missing feature.
fn newest_since(missing: &[KernelFeature]) -> &'static str {
    missing
        .iter()
        .map(|f| f.since)
        .max_by_key(|since| release_number(since))
        .unwrap_or("?")
}

/// `"5.14"` as (5, 14), for ordering releases.
fn release_number(release: &str) -> (u32, u32) {
    let mut parts = release
        .split(['.', '-', '+'])
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// How one feature is probed.
#[derive(Debug, Clone, Copy)]
enum Probe {
    Program(ProgramType),
    /// A `BPF_PROG_TYPE_CGROUP_SOCK_ADDR` program for this `enum bpf_attach_type` hook.
    SockAddrHook(u32),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on an LRU hash map (how the agent takes a record).
    LruLookupAndDelete,
    /// A bpf(2) command, probed with invalid descriptors in its attribute.
    Command(libc::c_int, [u32; 4]),
}

const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// Everything `proxy-ebpf` and this module use, in the order a kernel would have gained them.
const REQUIRED: &[(KernelFeature, Probe)] = &[
    (
        feature("sock_ops programs", "4.13"),
        Probe::Program(ProgramType::SockOps),
    ),
    (
        feature("cgroup sock_addr programs", "4.17"),
        Probe::Program(ProgramType::CgroupSockAddr),
    ),
    (
        feature("the cgroup connect4 hook", "4.17"),
        Probe::SockAddrHook(attach_type::CGROUP_INET4_CONNECT),
    ),
    (
        feature("the cgroup connect6 hook", "4.17"),
        Probe::SockAddrHook(attach_type::CGROUP_INET6_CONNECT),
    ),
    (
        feature("the cgroup getpeername4 hook", "5.8"),
        Probe::SockAddrHook(attach_type::CGROUP_INET4_GETPEERNAME),
    ),
    (
        feature("the cgroup getpeername6 hook", "5.8"),
        Probe::SockAddrHook(attach_type::CGROUP_INET6_GETPEERNAME),
    ),
    (feature("hash maps", "3.19"), Probe::Map(MapType::Hash)),
    (feature("array maps", "3.19"), Probe::Map(MapType::Array)),
    (
        feature("LRU hash maps", "4.10"),
        Probe::Map(MapType::LruHash),
    ),
    (feature("sockmaps", "4.14"), Probe::Map(MapType::SockMap)),
    (
        feature("socket storage maps", "5.2"),
        Probe::Map(MapType::SkStorage),
    ),
    (
        feature("bpf_get_socket_cookie in sock_addr programs", "5.0"),
        Probe::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
        ),
    ),
    (
        feature("bpf_sk_release in sock_addr programs", "5.0"),
        Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_sk_release),
    ),
    (
        feature("bpf_get_current_cgroup_id in sock_addr programs", "5.7"),
        Probe::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_current_cgroup_id,
        ),
    ),
    (
        feature("bpf_get_netns_cookie in sock_addr programs", "5.7"),
        Probe::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
        ),
    ),
    (
        // Available to sock_ops earlier; 5.10 is the oldest release the programs were seen to
        // load on (see the README's kernel list).
        feature("bpf_sk_storage_get in sock_ops programs", "5.10"),
        Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sk_storage_get),
    ),
    (
        feature("bpf links on cgroups", "5.7"),
        Probe::Command(
            bpf_sys::BPF_LINK_CREATE,
            [u32::MAX, u32::MAX, attach_type::CGROUP_INET4_CONNECT, 0],
        ),
    ),
    (
        feature("detaching a bpf link", "5.9"),
        Probe::Command(bpf_sys::BPF_LINK_DETACH, [u32::MAX, 0, 0, 0]),
    ),
    (
        feature("lookup-and-delete on LRU hash maps", "5.14"),
        Probe::LruLookupAndDelete,
    ),
];

const fn feature(name: &'static str, since: &'static str) -> KernelFeature {
    KernelFeature { name, since }
}

/// Probes every feature the redirect needs. `Err(RedirectError::MissingKernelFeatures)` names
/// what is missing; other errors mean a probe itself failed (no permission, say).
///
/// The agent checks before it binds anything, and `Redirect::attach` and `take_over` check again
/// for their other callers: the verdict is kept for the process (a kernel does not change under
/// it), so the probes run once. A failed probe is not kept: it is tried again.
pub fn check_kernel() -> Result<(), RedirectError> {
    static VERDICT: std::sync::OnceLock<Result<(), MissingKernelFeatures>> =
        std::sync::OnceLock::new();
    if let Some(verdict) = VERDICT.get() {
        return verdict.clone().map_err(Into::into);
    }
    let verdict = probe_kernel()?;
    VERDICT.get_or_init(|| verdict).clone().map_err(Into::into)
}

fn probe_kernel() -> Result<Result<(), MissingKernelFeatures>, RedirectError> {
    let mut missing = Vec::new();
    for (feature, probe) in REQUIRED {
        if !supported(*probe)
            .map_err(|e| RedirectError::kernel(format!("probing {}", feature.name), e))?
        {
            missing.push(*feature);
        }
    }
    if missing.is_empty() {
        tracing::debug!(
            features = REQUIRED.len(),
            "the kernel has every feature the redirect needs"
        );
        return Ok(Ok(()));
    }
    Ok(Err(MissingKernelFeatures {
        missing,
        running: kernel_release(),
    }))
}

/// A probe that could not tell (the kernel refused the probe itself, say for lack of privilege).
#[derive(Debug, thiserror::Error)]
enum ProbeFailed {
    #[error(transparent)]
    Program(#[from] aya::programs::ProgramError),
    #[error(transparent)]
    Syscall(#[from] aya::sys::SyscallError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn supported(probe: Probe) -> Result<bool, ProbeFailed> {
    Ok(match probe {
        Probe::Program(program) => is_program_supported(program)?,
        Probe::SockAddrHook(hook) => {
            match bpf_sys::load_trivial_program(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, hook) {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => false,
                Err(e) => return Err(e.into()),
            }
        }
        Probe::Map(map) => is_map_supported(map)?,
        Probe::Helper(program, helper) => is_helper_supported(program, helper)?,
        Probe::LruLookupAndDelete => {
            let map = bpf_sys::small_map(BPF_MAP_TYPE_LRU_HASH)?;
            match bpf_sys::map_take::<u32, u32>(std::os::fd::AsFd::as_fd(&map), &0) {
                // The map is empty: a kernel that supports the operation says "no such key".
                Ok(_) => true,
                // ENOTSUPP (524, kernel-internal): the operation exists, not for this map type.
                Err(e) if matches!(e.raw_os_error(), Some(524 | libc::EINVAL)) => false,
                Err(e) => return Err(e.into()),
            }
        }
        Probe::Command(command, attr) => bpf_sys::command_known(command, attr)?,
    })
}

/// `uname -r`.
fn kernel_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_each_feature_and_the_release_that_brings_them_all() {
        let err = MissingKernelFeatures {
            missing: vec![
                feature("lookup-and-delete on LRU hash maps", "5.14"),
                feature("detaching a bpf link", "5.9"),
            ],
            running: "5.8.0".into(),
        };
        let text = err.to_string();
        assert!(
            text.contains("lookup-and-delete on LRU hash maps (Linux 5.14)"),
            "{text}"
        );
        assert!(text.contains("detaching a bpf link (Linux 5.9)"), "{text}");
        assert!(
            text.contains("Run this node on Linux 5.14 or later"),
            "{text}"
        );
        assert!(text.contains("ordinary Service routing"), "{text}");
    }

    #[test]
    fn releases_order_numerically() {
        assert!(release_number("5.14") > release_number("5.9"));
        assert!(release_number("6.1") > release_number("5.14"));
        assert_eq!(release_number("6.12.117+deb13-amd64"), (6, 12));
    }

    #[test]
    fn every_feature_is_probed_once() {
        let mut names: Vec<_> = REQUIRED.iter().map(|(f, _)| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), REQUIRED.len());
    }
}
