//! The eBPF object embedded in the agent, and loading its programs into the kernel.

use aya::{
    maps::{MapData, SockHash},
    programs::{Program, ProgramError, SkMsg},
    Ebpf, EbpfError, EbpfLoader,
};
use proxy_common::SocketPair;

use super::RedirectError;

/// The object `proxy-agent/build.rs` builds from `proxy-ebpf` (ELF, BPF little-endian).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// A fingerprint of [`OBJECT`] (FNV-1a, 64 bits, and the length): two agents with the same
/// fingerprint run byte-identical programs, so a successor can keep its predecessor's programs and
/// maps instead of swapping them (see `redirect/takeover.rs`). Stable across builds and compilers,
/// unlike `std`'s hasher.
pub fn object_digest() -> String {
    let hash = OBJECT.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("fnv1a64:{hash:016x}:{}", OBJECT.len())
}

/// Parses the object and creates its maps (programs are loaded one by one afterwards).
pub(crate) fn load() -> Result<Ebpf, RedirectError> {
    if OBJECT.is_empty() {
        return Err(RedirectError::ObjectMissing {
            reason: "the embedded object is empty".into(),
        });
    }
    EbpfLoader::new().load(OBJECT).map_err(|e| match e {
        EbpfError::ParseError(parse) => RedirectError::ObjectMissing {
            reason: parse.to_string(),
        },
        other => RedirectError::kernel("creating the eBPF maps", other),
    })
}

/// Loads every program of the embedded object into the kernel without attaching any: the
/// verifier's verdict on this kernel, for startup checks and tests. Returns the programs' names,
/// sorted. Nothing stays loaded afterwards.
pub fn verify_programs() -> Result<Vec<String>, RedirectError> {
    let mut ebpf = load()?;
    load_all(&mut ebpf)?;
    let mut names: Vec<String> = ebpf.programs().map(|(name, _)| name.to_owned()).collect();
    names.sort();
    Ok(names)
}

/// Relays the programs' debug logs (present in debug builds only: see `proxy-agent/build.rs`)
/// to the agent's log, target `proxy_ebpf`, from a task of the current runtime. Without logs in
/// the object, or outside a runtime (tests that load programs directly), nothing happens.
pub(crate) fn follow_program_logs(ebpf: &mut Ebpf) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let Ok(logger) = aya_log::EbpfLogger::init(ebpf) else {
        return; // a release build: its programs log nothing
    };
    runtime.spawn(async move {
        // SAFETY: the logger owns the ring buffer's descriptor, open for as long as the logger
        // lives inside the AsyncFd, and always reports that same descriptor.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let Ok(mut logs) = registered else { return };
        while let Ok(mut ready) = logs.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
}

/// Loads every program of the object into the kernel, without attaching any.
pub(crate) fn load_all(ebpf: &mut Ebpf) -> Result<(), RedirectError> {
    for (name, program) in ebpf.programs_mut() {
        load_program(name, program)?;
    }
    Ok(())
}

/// Loads one program (of the three kinds the object contains) into the kernel.
pub(crate) fn load_program(name: &str, program: &mut Program) -> Result<(), RedirectError> {
    let loaded = match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        other => {
            return Err(RedirectError::ObjectMismatch {
                name: format!("{name} (of unexpected type {:?})", other.prog_type()),
            })
        }
    };
    loaded.map_err(|e| match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } if io_error.raw_os_error() != Some(libc::EPERM) => RedirectError::Verifier {
            program: name.to_owned(),
            log: format!("{io_error}\n{verifier_log}"),
        },
        other => RedirectError::kernel(format!("loading program {name}"), other),
    })
}

/// Attaches `gamma_local_msg` to `LOCAL_SOCKETS`. Harmless while local sockets are off: no socket
/// joins the map, so the program never runs.
///
/// The attachment must outlive this process's handle: the kernel keeps a sockhash's programs while
/// some process holds a descriptor of the map (the programs using it do not count), and a successor
/// running the same programs is handed that descriptor (`SHARED_MAPS`) and never attaches again.
/// aya would detach the program when its handle drops, so the handle is forgotten.
pub(crate) fn attach_local_msg(ebpf: &mut Ebpf) -> Result<(), RedirectError> {
    let map = ebpf.map(proxy_common::maps::LOCAL_SOCKETS).ok_or_else(|| {
        RedirectError::ObjectMismatch {
            name: proxy_common::maps::LOCAL_SOCKETS.to_owned(),
        }
    })?;
    let sockets: SockHash<&MapData, SocketPair> =
        SockHash::try_from(map).map_err(|_| RedirectError::ObjectMismatch {
            name: format!(
                "{} (unexpected type or layout)",
                proxy_common::maps::LOCAL_SOCKETS
            ),
        })?;
    let map_fd = sockets
        .fd()
        .try_clone()
        .map_err(|e| RedirectError::io("duplicating the local sockets map", e))?;
    let name = proxy_common::programs::LOCAL_MSG;
    let program: &mut SkMsg = ebpf
        .program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| RedirectError::ObjectMismatch {
            name: name.to_owned(),
        })?;
    let link = program
        .attach(&map_fd)
        .and_then(|id| program.take_link(id))
        .map_err(|e| {
            RedirectError::kernel(format!("attaching {name} to the local sockets map"), e)
        })?;
    std::mem::forget(link);
    Ok(())
}
