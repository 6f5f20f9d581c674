//! What can go wrong when loading, attaching and feeding the kernel redirect, phrased for the
//! operator who has to fix it.

use std::{io, path::PathBuf};

use super::probe::MissingKernelFeatures;

/// An error of the kernel redirect. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(
        "the kernel refused {action}: permission denied. Run the agent as root, or grant it \
         CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (attaching to a cgroup and reading other \
         processes' BPF objects need them)"
    )]
    PermissionDenied {
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error(
        "no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo): mount one \
         (`mount -t cgroup2 none /sys/fs/cgroup`) or boot with systemd.unified_cgroup_hierarchy=1"
    )]
    NoCgroup2,

    #[error(
        "{path} is not a directory of the cgroup v2 hierarchy{}: pass the cgroup that contains \
         the pods (e.g. <cgroup2 mount>/kubepods.slice)",
        mount.as_ref().map(|m| format!(" (cgroup v2 is mounted at {})", m.display())).unwrap_or_default()
    )]
    NotCgroup2 {
        path: PathBuf,
        mount: Option<PathBuf>,
    },

    #[error(
        "the eBPF object embedded in this binary is missing or unreadable ({reason}): it was \
         built without the eBPF programs; run `cargo xtask setup` (nightly, rust-src, bpf-linker) \
         and rebuild"
    )]
    ObjectMissing { reason: String },

    #[error(
        "the embedded eBPF object has no program or map `{name}`: the agent and proxy-ebpf were \
         built from different sources; rebuild both (`cargo build -p proxy-agent`)"
    )]
    ObjectMismatch { name: String },

    #[error(
        "the kernel verifier rejected program `{program}`: a kernel older than the programs need \
         (the README lists the kernels they are verified on), or a build with a different LLVM than bpf-linker expects (rerun `cargo xtask \
         setup`). Verifier log:\n{log}"
    )]
    Verifier { program: String, log: String },

    /// Probed before anything is attached (`probe.rs`): the agent goes on without the redirect.
    #[error(transparent)]
    MissingKernelFeatures(#[from] MissingKernelFeatures),

    #[error("invalid agent listener: {0}")]
    InvalidListener(String),

    #[error(
        "cannot take over the running agent's redirect: {0}. Start this agent with the running \
         one's --redirect and --cgroup, or stop the running agent first (its pods use ordinary \
         Service routing until this one has attached)"
    )]
    InvalidTakeover(String),

    #[error(
        "{wanted} entries for the kernel map {map} exceed its capacity of {capacity}: raise \
         proxy_common::MAX_{map} and rebuild"
    )]
    SetTooLarge {
        map: &'static str,
        wanted: usize,
        capacity: u32,
    },

    #[error("{action} failed: {}", chain(source.as_ref()))]
    Kernel {
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
}

impl RedirectError {
    /// Wraps a failed kernel operation, telling permission problems apart: they are the common case
    /// on a misconfigured node and have a clear fix.
    pub(crate) fn kernel(
        action: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let action = action.into();
        if is_permission_denied(&source) {
            Self::PermissionDenied {
                action,
                source: Box::new(source),
            }
        } else {
            Self::Kernel {
                action,
                source: Box::new(source),
            }
        }
    }

    pub(crate) fn io(action: impl Into<String>, source: io::Error) -> Self {
        if source.raw_os_error() == Some(libc::EPERM) {
            return Self::PermissionDenied {
                action: action.into(),
                source: Box::new(source),
            };
        }
        Self::Io {
            action: action.into(),
            source,
        }
    }
}

/// An error and its sources, joined: the innermost cause (an errno, usually) is what an operator
/// needs, and many log formats print only the outer message.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        text.push_str(": ");
        text.push_str(&e.to_string());
        current = e.source();
    }
    text
}

/// Whether an EPERM sits anywhere in the error's source chain. EACCES is not included: from
/// BPF_PROG_LOAD it means "the verifier said no", which has its own variant.
fn is_permission_denied(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.raw_os_error() == Some(libc::EPERM) {
                return true;
            }
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] io::Error);

    #[test]
    fn eperm_deep_in_the_chain_is_a_permission_error() {
        let err =
            RedirectError::kernel("loading", Outer(io::Error::from_raw_os_error(libc::EPERM)));
        assert!(
            matches!(err, RedirectError::PermissionDenied { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("CAP_BPF"));
    }

    #[test]
    fn other_errors_stay_kernel_errors() {
        let err =
            RedirectError::kernel("loading", Outer(io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(matches!(err, RedirectError::Kernel { .. }), "{err:?}");
    }
}
