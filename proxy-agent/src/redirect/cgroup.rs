//! cgroup v2 facts the redirect needs: where the hierarchy is mounted, a cgroup's id, and the way
//! back from an id (as recorded by the kernel at `connect()`) to a directory, hence to a pod.
//!
//! A cgroup's id is the inode number of its directory in the cgroup v2 hierarchy (64-bit kernels
//! never reuse one). The hierarchy is not always at /sys/fs/cgroup: hybrid systems mount it at
//! /sys/fs/cgroup/unified, so the mount point is read from /proc/self/mountinfo.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use super::RedirectError;

/// `statfs` magic of a cgroup v2 filesystem (CGROUP2_SUPER_MAGIC).
const CGROUP2_SUPER_MAGIC: libc::c_long = 0x6367_7270;

/// Where this process sees the cgroup v2 hierarchy.
pub fn cgroup2_mount() -> Result<PathBuf, RedirectError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| RedirectError::io("reading /proc/self/mountinfo", e))?;
    find_cgroup2_mount(&mountinfo).ok_or(RedirectError::NoCgroup2)
}

/// The mount point of the first cgroup2 filesystem in a mountinfo text.
pub(crate) fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <dev> <root> <mount point> <options> [optional...] - <fstype> <source> ..."
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        left.split(' ')
            .nth(4)
            .map(|p| PathBuf::from(unescape_mountinfo(p)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The id of the cgroup v2 directory `dir`, after checking that it is one.
pub fn cgroup_id(dir: &Path) -> Result<u64, RedirectError> {
    let not_cgroup2 = || RedirectError::NotCgroup2 {
        path: dir.to_owned(),
        mount: cgroup2_mount().ok(),
    };
    if !is_cgroup2(dir) {
        return Err(not_cgroup2());
    }
    let meta = fs::metadata(dir)
        .map_err(|e| RedirectError::io(format!("reading {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(not_cgroup2());
    }
    Ok(meta.ino())
}

fn is_cgroup2(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|stat| stat.f_type == CGROUP2_SUPER_MAGIC)
}

/// The cgroup id of the calling process: what the kernel programs compare with to exempt the
/// agent's own sockets.
///
/// /proc/self/cgroup names it relative to the process's cgroup namespace. In a container with its
/// own namespace (containerd's default on cgroup v2) that reads `/`, which in the host's hierarchy
/// mounted at the same place would be the host's root. Then the agent's cgroup is the one whose
/// `cgroup.procs` lists its pid (translated into its pid namespace by the kernel), searched under
/// its pod's cgroup when `POD_UID` (downward API) names the pod, else under the whole hierarchy.
pub fn own_cgroup_id() -> Result<u64, RedirectError> {
    let proc_cgroup = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| RedirectError::io("reading /proc/self/cgroup", e))?;
    let relative = unified_path(&proc_cgroup).ok_or(RedirectError::NoCgroup2)?;
    let mount = cgroup2_mount()?;
    if relative == "/" {
        let pod_uid = std::env::var("POD_UID").ok().filter(|u| !u.is_empty());
        let start = pod_uid
            .as_deref()
            .and_then(|uid| pod_cgroup(&mount, uid))
            .unwrap_or_else(|| mount.clone());
        if let Some(own) = cgroup_listing(&start, std::process::id()) {
            return cgroup_id(&own);
        }
        tracing::warn!(
            searched = %start.display(),
            "this process's cgroup was not found (a cgroup namespace hides it); its own \
             connections to mesh Services would be steered back to it"
        );
    }
    cgroup_id(&mount.join(relative.trim_start_matches('/')))
}

/// The pod-level cgroup of the pod with `uid`: the shallowest directory naming it.
pub fn pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    let mut queue = std::collections::VecDeque::from([root.to_owned()]);
    while let Some(dir) = queue.pop_front() {
        let names_pod = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(pod_uid_in_component)
            .is_some_and(|found| found == uid);
        if names_pod {
            return Some(dir);
        }
        queue.extend(subdirectories(&dir));
    }
    None
}

/// The cgroup under `root` (included) whose `cgroup.procs` lists `pid`.
pub fn cgroup_listing(root: &Path, pid: u32) -> Option<PathBuf> {
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let listed = fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|l| l.trim().parse() == Ok(pid)));
        if listed {
            return Some(dir);
        }
        pending.extend(subdirectories(&dir));
    }
    None
}

/// Child cgroups (directories); none if unreadable (removed meanwhile).
fn subdirectories(dir: &Path) -> impl Iterator<Item = PathBuf> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
}

/// The cgroup v2 path in a /proc/<pid>/cgroup text: the `0::<path>` line.
pub(crate) fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
}

/// Maps cgroup ids back to directories, walking the hierarchy again only when an id is unknown
/// (a cgroup created since the last walk). Shareable: lookups take a short lock, never held
/// through a walk (milliseconds on a node of a thousand cgroups: every worker accepting a
/// connection meanwhile would wait); one walk at a time.
#[derive(Debug)]
pub struct CgroupDirs {
    root: PathBuf,
    known: Mutex<Known>,
    /// Held through a walk: lookups of unknown ids wait for the one running, then look again.
    walking: Mutex<()>,
    /// [`scan`], but in tests.
    walk: fn(&Path) -> Walk,
}

#[derive(Debug, Default)]
struct Known {
    by_id: HashMap<u64, PathBuf>,
    /// Ids a complete walk did not find (a cgroup removed before its connection was accepted, or
    /// outside the root): asked again, they are not worth another walk. Cgroup ids are not
    /// reused.
    missing: std::collections::HashSet<u64>,
    walks: u64,
}

/// Missing ids remembered at most; past that the list starts over.
const MISSING_KEPT: usize = 4096;

impl CgroupDirs {
    /// Ids under `root` (the cgroup v2 mount, or the subtree holding the pods) are resolvable.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            known: Mutex::new(Known::default()),
            walking: Mutex::new(()),
            walk: scan,
        }
    }

    /// The directory of the cgroup with this id, if it is under the root and still exists or
    /// existed at the last walk.
    pub fn path_of(&self, cgroup_id: u64) -> Option<PathBuf> {
        if let Some(known) = self.known_now(cgroup_id) {
            return known;
        }
        let _walking = self
            .walking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The walk this one waited for may have found it.
        if let Some(known) = self.known_now(cgroup_id) {
            return known;
        }
        let walk = (self.walk)(&self.root);
        let mut known = self.known();
        if walk.complete {
            known.by_id = walk.dirs;
        } else {
            // What it missed may be known from before: kept (cgroup ids are not reused).
            known.by_id.extend(walk.dirs);
        }
        known.walks += 1;
        let found = known.by_id.get(&cgroup_id).cloned();
        // A walk cut short (the agent out of file descriptors for a moment) proves nothing
        // missing: the next connection from there walks again.
        if found.is_none() && walk.complete {
            if known.missing.len() >= MISSING_KEPT {
                known.missing.clear();
            }
            known.missing.insert(cgroup_id);
        }
        found
    }

    /// What is known of `cgroup_id` without a walk: its directory, or that a complete walk did
    /// not find it (`Some(None)`).
    fn known_now(&self, cgroup_id: u64) -> Option<Option<PathBuf>> {
        let known = self.known();
        if let Some(path) = known.by_id.get(&cgroup_id) {
            return Some(Some(path.clone()));
        }
        known.missing.contains(&cgroup_id).then_some(None)
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many times the hierarchy was walked.
    #[cfg(test)]
    fn walks(&self) -> u64 {
        self.known().walks
    }
}

/// What a walk of the hierarchy found: every directory by inode number, i.e. by cgroup id.
#[derive(Debug, Default)]
pub struct Walk {
    pub dirs: HashMap<u64, PathBuf>,
    /// Whether every directory was read: subtrees removed during the walk are skipped, and
    /// leave it complete; one that failed otherwise does not.
    pub complete: bool,
}

/// Every directory under `root` (included).
pub fn scan(root: &Path) -> Walk {
    let mut walk = Walk {
        complete: true,
        ..Walk::default()
    };
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let entries = match fs::metadata(&dir) {
            Ok(meta) => {
                let entries = fs::read_dir(&dir);
                walk.dirs.insert(meta.ino(), dir);
                entries
            }
            Err(e) => Err(e),
        };
        let entries = match entries {
            Ok(entries) => entries,
            Err(e) => {
                walk.complete &= walk_complete_after(&e);
                continue;
            }
        };
        for entry in entries {
            match entry {
                // Only directories are cgroups; the files in them are interface files.
                Ok(entry) if entry.file_type().is_ok_and(|t| t.is_dir()) => {
                    pending.push(entry.path());
                }
                Ok(_) => {}
                Err(e) => walk.complete &= walk_complete_after(&e),
            }
        }
    }
    walk
}

/// Whether a walk that met this error still saw everything there was: a directory removed
/// meanwhile (its cgroup gone) was not missed.
fn walk_complete_after(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::NotFound
}

/// The UID of the pod whose cgroup contains `cgroup_dir`, from the kubelet's naming:
/// `.../pod<uid>/...` (cgroupfs driver) or `.../kubepods-<qos>-pod<uid_with_underscores>.slice/...`
/// (systemd driver). A static pod's UID is its manifest's hash (32 hex digits), not a UUID.
/// The shallowest such part, the kubelet's: below it, a container that may make cgroups could
/// name one after another pod, and be taken for it.
pub fn pod_uid(cgroup_dir: &Path) -> Option<String> {
    cgroup_dir
        .components()
        .find_map(|c| pod_uid_in_component(c.as_os_str().to_str()?))
}

fn pod_uid_in_component(name: &str) -> Option<String> {
    let name = name.strip_suffix(".slice").unwrap_or(name);
    let start = name.rfind("pod")? + "pod".len();
    let uid = name[start..].replace('_', "-");
    is_pod_uid(&uid).then_some(uid)
}

/// A UUID, or a static pod's manifest hash (the kubelet's `kubernetes.io/config.hash`: an MD5
/// in 32 hex digits), which the kubelet runs a static pod under.
fn is_pod_uid(s: &str) -> bool {
    let uuid = s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    uuid || (s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f3c5a7e-1b2d-4c6e-8f90-a1b2c3d4e5f6";

    #[test]
    fn finds_its_own_cgroup_by_pod_and_pid() {
        let folder = crate::test_dir::TestDir::new("cgroup-test");
        let root: &Path = &folder;
        let systemd_uid = UID.replace('-', "_");
        let pod = root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice"
        ));
        let other =
            root.join("kubepods.slice/kubepods-pod11111111_2222_3333_4444_555555555555.slice");
        let pause = pod.join("cri-containerd-aaaa.scope");
        let agent = pod.join("cri-containerd-bbbb.scope");
        for dir in [&pause, &agent, &other] {
            fs::create_dir_all(dir).unwrap();
        }
        fs::write(pause.join("cgroup.procs"), "1\n").unwrap();
        fs::write(agent.join("cgroup.procs"), "7\n42\n").unwrap();
        fs::write(other.join("cgroup.procs"), "42\n").unwrap();
        let found_pod = pod_cgroup(root, UID);
        assert_eq!(found_pod.as_deref(), Some(pod.as_path()));
        // Within the pod: the agent container's cgroup; pid 42 also appears in another pod's (a
        // different pid namespace), which the pod narrows away.
        assert_eq!(cgroup_listing(&pod, 42), Some(agent.clone()));
        assert_eq!(cgroup_listing(&pod, 9), None);
        assert_eq!(
            pod_cgroup(root, "99999999-9999-9999-9999-999999999999"),
            None
        );
    }

    #[test]
    fn finds_the_cgroup2_mount_of_a_hybrid_system() {
        let mountinfo = "\
35 25 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
41 35 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw";
        assert_eq!(
            find_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_cgroup2_mount("35 25 0:30 / /sys ro - sysfs sysfs ro"),
            None
        );
    }

    #[test]
    fn unescapes_mount_points() {
        let mountinfo = r"41 35 0:38 / /mnt/my\040cgroups rw - cgroup2 cgroup2 rw";
        assert_eq!(
            find_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }

    #[test]
    fn reads_the_unified_line_of_proc_cgroup() {
        let text = "4:memory:/x\n0::/kubepods.slice/a.scope\n";
        assert_eq!(unified_path(text), Some("/kubepods.slice/a.scope"));
        assert_eq!(unified_path("4:memory:/x\n"), None);
    }

    #[test]
    fn pod_uid_from_the_cgroupfs_driver() {
        let path = format!("/sys/fs/cgroup/kubepods/burstable/pod{UID}/4f1c2e");
        assert_eq!(pod_uid(Path::new(&path)).as_deref(), Some(UID));
    }

    #[test]
    fn a_pod_cgroup_made_inside_a_pods_is_not_taken_for_another_pod() {
        let other = "0a1b2c3d-0000-4000-8000-000000000001";
        let path = format!("/sys/fs/cgroup/kubepods/burstable/pod{UID}/4f1c2e/pod{other}");
        assert_eq!(pod_uid(Path::new(&path)).as_deref(), Some(UID));
        let uid = UID.replace('-', "_");
        let systemd = format!(
            "/sys/fs/cgroup/kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-4f1c.scope/kubepods-pod{}.slice",
            other.replace('-', "_")
        );
        assert_eq!(pod_uid(Path::new(&systemd)).as_deref(), Some(UID));
    }

    #[test]
    fn pod_uid_from_the_systemd_driver() {
        let uid = UID.replace('-', "_");
        let path = format!(
            "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-4f1c.scope"
        );
        assert_eq!(pod_uid(Path::new(&path)).as_deref(), Some(UID));
        let guaranteed = format!("/sys/fs/cgroup/kubepods.slice/kubepods-pod{uid}.slice");
        assert_eq!(pod_uid(Path::new(&guaranteed)).as_deref(), Some(UID));
    }

    #[test]
    fn a_static_pods_uid_is_its_manifest_hash() {
        let hash = "6c4a3c3f1e5b7d9a0b2c4d6e8f0a1b2c";
        let path = format!(
            "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-4f1c.scope"
        );
        assert_eq!(pod_uid(Path::new(&path)).as_deref(), Some(hash));
        let cgroupfs = format!("/sys/fs/cgroup/kubepods/besteffort/pod{hash}/4f1c2e");
        assert_eq!(pod_uid(Path::new(&cgroupfs)).as_deref(), Some(hash));
    }

    #[test]
    fn no_pod_uid_outside_pods() {
        assert_eq!(
            pod_uid(Path::new(
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice"
            )),
            None
        );
        assert_eq!(
            pod_uid(Path::new("/sys/fs/cgroup/system.slice/kubelet.service")),
            None
        );
    }

    #[test]
    fn scan_maps_inodes_to_directories() {
        let folder = crate::test_dir::TestDir::new("cgroup-scan");
        let root: &Path = &folder;
        let child = root.join("a/b");
        fs::create_dir_all(&child).unwrap();
        fs::write(root.join("a/cgroup.procs"), "").unwrap();
        let found = scan(root);
        assert!(found.complete);
        let found = found.dirs;
        let child_ino = fs::metadata(&child).unwrap().ino();
        assert_eq!(found.get(&child_ino), Some(&child));
        assert_eq!(found.len(), 3, "{found:?}");
        let dirs = CgroupDirs::new(root);
        assert_eq!(dirs.path_of(child_ino), Some(child.clone()));
        assert_eq!(dirs.walks(), 1);
        assert_eq!(dirs.path_of(child_ino), Some(child), "known: no walk");
        // An id no walk finds (a cgroup gone) costs one walk, not one per connection.
        let gone = u64::MAX;
        assert_eq!(dirs.path_of(gone), None);
        assert_eq!(dirs.path_of(gone), None);
        assert_eq!(dirs.walks(), 2);
        // A cgroup created since is found by a new walk.
        let new = root.join("a/c");
        fs::create_dir_all(&new).unwrap();
        let new_ino = fs::metadata(&new).unwrap().ino();
        assert_eq!(dirs.path_of(new_ino), Some(new));
        assert_eq!(dirs.walks(), 3);
    }

    /// An id a walk cut short did not find (the agent out of file descriptors for a moment) is
    /// looked for again: remembered as missing, its container's connections would never be
    /// verified again.
    #[test]
    fn an_id_an_incomplete_walk_missed_is_looked_for_again() {
        use std::sync::atomic::{AtomicBool, Ordering};
        static FAILS: AtomicBool = AtomicBool::new(true);
        fn walk(root: &Path) -> Walk {
            let mut walk = scan(root);
            if FAILS.swap(false, Ordering::Relaxed) {
                walk.dirs.retain(|_, dir| dir == root);
                walk.complete = false;
            }
            walk
        }
        let folder = crate::test_dir::TestDir::new("cgroup-incomplete");
        let root: &Path = &folder;
        let child = root.join("a");
        fs::create_dir_all(&child).unwrap();
        let child_ino = fs::metadata(&child).unwrap().ino();
        let dirs = CgroupDirs {
            walk,
            ..CgroupDirs::new(root)
        };
        assert_eq!(dirs.path_of(child_ino), None, "the walk failed");
        assert_eq!(dirs.path_of(child_ino), Some(child.clone()));
        assert_eq!(dirs.walks(), 2);
        // An incomplete walk forgets nothing known before.
        let new = root.join("b");
        fs::create_dir_all(&new).unwrap();
        FAILS.store(true, Ordering::Relaxed);
        assert_eq!(dirs.path_of(fs::metadata(&new).unwrap().ino()), None);
        assert_eq!(dirs.path_of(child_ino), Some(child), "still known");
        assert_eq!(dirs.walks(), 3);
    }

    /// A known id is looked up while a walk for an unknown one runs: the walk held the lock of
    /// every lookup, and each worker accepting a connection waited for it.
    #[test]
    fn a_walk_holds_up_no_lookup_of_a_known_id() {
        fn slow_walk(root: &Path) -> Walk {
            std::thread::sleep(std::time::Duration::from_millis(300));
            scan(root)
        }
        let folder = crate::test_dir::TestDir::new("cgroup-slow-walk");
        let root: &Path = &folder;
        let known = root.join("known");
        fs::create_dir_all(&known).unwrap();
        let known_ino = fs::metadata(&known).unwrap().ino();
        let dirs = std::sync::Arc::new(CgroupDirs {
            walk: slow_walk,
            ..CgroupDirs::new(root)
        });
        assert_eq!(dirs.path_of(known_ino), Some(known.clone()));
        let unknown = root.join("new");
        fs::create_dir_all(&unknown).unwrap();
        let unknown_ino = fs::metadata(&unknown).unwrap().ino();
        let walking = std::thread::spawn({
            let dirs = dirs.clone();
            move || dirs.path_of(unknown_ino)
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        let started = std::time::Instant::now();
        assert_eq!(dirs.path_of(known_ino), Some(known));
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_millis(150),
            "waited {took:?}"
        );
        assert_eq!(walking.join().unwrap(), Some(unknown));
        assert_eq!(dirs.walks(), 2);
    }
}
