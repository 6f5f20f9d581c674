//! The manifest-folder source: a folder of the YAML manifests `kubectl apply` takes, polled, its
//! changes sent to the publisher as one feed (`manifests`).
//!
//! Parsing is the engine's (`gamma_engine::manifests`). This file keeps what the folder held: on a
//! change, a file whose YAML does not parse keeps its last good objects, and so does each invalid
//! document that can still be identified (kind, namespace, name); a file removed takes its
//! objects with it (a renamed one's stay until its new name is read).
//!
//! A changed file is read once it held still for one poll, an emptied one once it stayed empty
//! for [`EMPTY_SETTLE`]: one being written (`kubectl get … > routes.yaml` truncates it first,
//! then waits for the API server) would otherwise be read empty or cut, and its objects deleted
//! meanwhile. A writer that pauses longer mid-file should write a new file and rename it.
//! Hidden entries are skipped: a ConfigMap mounted as a folder shows each file three times
//! (`svc.yaml`, `..data/svc.yaml` and the timestamped folder `..data` points to), and the kubelet
//! swaps the last two under the reader.

use super::{Feed, Health, Update, Updates};
use crate::telemetry::unix_now;
use gamma_engine::manifests::{parse, Problem, Severity};
use gamma_engine::{Object, ObjectRef};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// This source's one feed.
pub const FEED: Feed = "manifests";

/// How long a file emptied must stay so before its objects go: a writer that truncated it may
/// still be waiting for what it writes (`kubectl get … > routes.yaml`).
const EMPTY_SETTLE: Duration = Duration::from_secs(3);

/// The manifests of a folder, what each file last contributed, and what was sent.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Polled before: files are then read only once they held still for a poll (the first poll
    /// reads the folder as it is).
    polled: bool,
    /// The folder's objects as last sent: every file's, the later file's where two declare one
    /// (as `kubectl apply` of the folder would leave it). Changes are sent against it, so an
    /// object moved from one file to another is not deleted after the other file applied it.
    sent: Objects,
    /// A folder's entries ([`list_dir`], but in tests).
    list: fn(&Path) -> std::io::Result<Vec<PathBuf>>,
    /// Sub-folders the last poll could not list: told once, not at every poll.
    unlisted: std::collections::BTreeSet<PathBuf>,
}

type Objects = BTreeMap<String, (ObjectRef, Object)>;

#[derive(Debug, Default)]
struct FileState {
    /// The stamp of the version read last.
    stamp: Option<Stamp>,
    /// The stamp seen at the last poll, and since when: a changed file is read once it held
    /// still for a poll, an empty one for [`EMPTY_SETTLE`].
    seen: Option<(Stamp, Instant)>,
    /// The objects this file last contributed.
    objects: Objects,
    /// Since when it is gone from the folder, while its objects are kept ([`ManifestDir::changes`]).
    gone_since: Option<Instant>,
}

/// What tells a file's versions apart without reading it: its inode, modification and change
/// times and length. The change time moves with any write or `chmod`, even one that keeps the
/// modification time (`cp -p`, `tar x`) or the length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    modified: SystemTime,
    changed: (i64, i64),
    len: u64,
}

impl FileState {
    /// Notes the file's `stamp` at this poll; says whether it held still since the last one (and
    /// for [`EMPTY_SETTLE`] if it is empty: most likely truncated by a writer that fills it later,
    /// as `kubectl get … > routes.yaml` does once the API server answers).
    fn settled(&mut self, stamp: Stamp) -> bool {
        let (still, since) = match self.seen {
            Some((seen, since)) if seen == stamp => (true, since),
            _ => (false, Instant::now()),
        };
        self.seen = Some((stamp, since));
        let settle = if stamp.len == 0 {
            EMPTY_SETTLE
        } else {
            Duration::ZERO
        };
        still && since.elapsed() >= settle
    }
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt as _;
        Stamp {
            inode: meta.ino(),
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            changed: (meta.ctime(), meta.ctime_nsec()),
            len: meta.len(),
        }
    }
}

fn object_id(object: &Object) -> String {
    object.describe()
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestDir {
            dir: dir.into(),
            files: BTreeMap::new(),
            polled: false,
            sent: Objects::new(),
            list: list_dir,
            unlisted: std::collections::BTreeSet::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads changed files and returns the folder's changes (deletions first) and the problems
    /// found in the files that changed. Files are read in name order (sub-folders included).
    pub fn changes(&mut self) -> std::io::Result<(Vec<Update>, Vec<Problem>)> {
        let mut updates = Vec::new();
        let mut problems = Vec::new();
        let mut seen = Vec::new();
        let mut changed = false;
        // A file changed but not read yet, waiting to hold still.
        let mut waiting = false;
        let listed = list_files(&self.dir, self.list)?;
        let told = std::mem::take(&mut self.unlisted);
        for (dir, e) in &listed.unlisted {
            self.unlisted.insert(dir.clone());
            seen.extend(self.files.keys().filter(|f| f.starts_with(dir)).cloned());
            if told.contains(dir) {
                continue;
            }
            problems.push(Problem {
                severity: Severity::Error,
                file: dir.clone(),
                document: 0,
                object: None,
                message: format!(
                    "cannot list this sub-folder ({e}): the objects of its files stay as last read"
                ),
            });
        }
        for path in listed.files {
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(_) => continue, // removed between listing and reading
            };
            seen.push(path.clone());
            let stamp = Stamp::of(&meta);
            let state = self.files.entry(path.clone()).or_default();
            let settled = state.settled(stamp);
            let stamp = Some(stamp);
            if state.stamp == stamp {
                continue;
            }
            if self.polled && !settled {
                waiting = true;
                continue;
            }
            state.stamp = stamp;
            changed = true;
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(Problem {
                        severity: Severity::Error,
                        file: path,
                        document: 0,
                        object: None,
                        message: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
            let parsed = parse(&path, &text);
            problems.extend(parsed.problems.iter().cloned());
            if parsed.unreadable {
                continue; // keep every object of the last good version of this file
            }
            let mut next: Objects = parsed
                .objects
                .into_iter()
                .map(|o| (object_id(&o), (o.reference(), o)))
                .collect();
            for identity in &parsed.invalid {
                let id = identity.describe();
                if let Some(kept) = state.objects.get(&id) {
                    next.entry(id).or_insert_with(|| kept.clone());
                }
            }
            state.objects = next;
        }
        self.polled = true;
        // Files that disappeared: their objects go (unless another file has them). A renamed
        // file (`mv`, a ConfigMap key renamed) is gone a poll before its new name, new, is read:
        // its objects stay while a file waits to be read, up to EMPTY_SETTLE, as an emptied
        // file's do.
        let files = self.files.len();
        let now = Instant::now();
        self.files.retain(|path, state| {
            if seen.contains(path) {
                state.gone_since = None;
                return true;
            }
            let gone_since = *state.gone_since.get_or_insert(now);
            waiting && now.duration_since(gone_since) < EMPTY_SETTLE
        });
        if !changed && files == self.files.len() {
            return Ok((updates, problems));
        }
        let mut folder = Objects::new();
        for state in self.files.values() {
            folder.extend(state.objects.iter().map(|(id, o)| (id.clone(), o.clone())));
        }
        for (id, (reference, _)) in &self.sent {
            if !folder.contains_key(id) {
                updates.push(Update::Delete(reference.clone()));
            }
        }
        for (id, (_, object)) in &folder {
            if self.sent.get(id).is_none_or(|(_, sent)| sent != object) {
                updates.push(Update::Apply(object.clone()));
            }
        }
        self.sent = folder;
        Ok((updates, problems))
    }

    /// Polls the folder every `every` and sends what changed, then this feed's health. The first
    /// pass failing ends the source with its error (the agent cannot start on it); later failures
    /// keep the last good objects and report the feed failing.
    pub async fn run(mut self, updates: Updates, every: Duration) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing_since = None;
        for pass in 0u64.. {
            ticker.tick().await;
            let health = match self.changes() {
                Ok((changes, problems)) => {
                    for problem in problems {
                        match problem.severity {
                            Severity::Warning => tracing::warn!("{problem}"),
                            Severity::Error => tracing::error!("{problem}"),
                        }
                    }
                    for change in changes {
                        updates.send(change).await?;
                    }
                    failing_since = None;
                    Health::Synced
                }
                Err(e) if pass == 0 => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "reading the manifest folder {}",
                        self.dir.display()
                    )));
                }
                Err(e) => {
                    tracing::error!(error = %e, dir = %self.dir.display(), "manifest folder unreadable; serving the last good table");
                    Health::Failing {
                        since: *failing_since.get_or_insert_with(unix_now),
                    }
                }
            };
            updates.send(Update::Health(FEED, health)).await?;
        }
        Ok(())
    }
}

/// The manifest files of a folder, and the sub-folders that could not be listed.
struct Listing {
    files: Vec<PathBuf>,
    unlisted: Vec<(PathBuf, std::io::Error)>,
}

/// Lists `dir` and its sub-folders, each once (a symlink back up the tree is not followed
/// round). The folder itself must be listed; a sub-folder that cannot be (a volume's root
/// `lost+found`, unreadable to the agent's user) is reported, not fatal: one folder must not
/// stop the others' changes from being read.
fn list_files(
    dir: &Path,
    list: fn(&Path) -> std::io::Result<Vec<PathBuf>>,
) -> std::io::Result<Listing> {
    use std::os::unix::fs::MetadataExt;
    let mut listing = Listing {
        files: Vec::new(),
        unlisted: Vec::new(),
    };
    let mut visited = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::metadata(&d).and_then(|meta| {
            let first_visit = visited.insert((meta.dev(), meta.ino()));
            first_visit.then(|| list(&d)).transpose()
        });
        let entries = match entries {
            Ok(Some(entries)) => entries,
            Ok(None) => continue,
            Err(e) if d == dir => return Err(e),
            // A sub-folder removed since it was listed (a ConfigMap's old version).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                listing.unlisted.push((d, e));
                continue;
            }
        };
        for path in entries {
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if is_manifest(&path) {
                listing.files.push(path);
            }
        }
    }
    listing.files.sort();
    Ok(listing)
}

/// The paths in folder `dir`.
fn list_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;
    use gamma_engine::{Index, ObjectKey};

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: ns}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]\n";

    /// Two polls of the source into `index` (a change is read once it held still for a poll):
    /// their problems, and whether ns/echo:80 is served.
    fn pass(source: &mut ManifestDir, index: &mut Index) -> (usize, bool) {
        let (mut updates, mut problems) = source.changes().unwrap();
        let (more_updates, more_problems) = source.changes().unwrap();
        updates.extend(more_updates);
        problems.extend(more_problems);
        poll_into(updates, index);
        (problems.len(), served(index))
    }

    /// One poll of the source into `index`: whether ns/echo:80 is served.
    fn poll(source: &mut ManifestDir, index: &mut Index) -> bool {
        poll_into(source.changes().unwrap().0, index);
        served(index)
    }

    fn served(index: &Index) -> bool {
        index
            .snapshot()
            .frontend_of(&ObjectKey::new("ns", "echo"), 80)
            .is_some()
    }

    fn poll_into(updates: Vec<Update>, index: &mut Index) {
        for update in updates {
            match update {
                Update::Apply(object) => index.apply(object),
                Update::Delete(reference) => index.delete(&reference),
                other => panic!("the folder source sent {other:?}"),
            }
        }
        index.publish();
    }

    /// A folder `name` with `SERVICE` in `svc.yaml`, not polled yet.
    fn a_service_file(name: &str) -> (TestDir, PathBuf, Index, ManifestDir) {
        let folder = TestDir::new(name);
        let file = folder.join("svc.yaml");
        std::fs::write(&file, SERVICE).unwrap();
        let source = ManifestDir::new(&*folder);
        (folder, file, Index::new(), source)
    }

    /// Lists folders as [`list_dir`] does, but one named `locked`, which it may not.
    fn all_but_locked(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        if dir.ends_with("locked") {
            return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        }
        list_dir(dir)
    }

    /// A sub-folder that cannot be listed is a problem, not a failure of the whole folder (an
    /// ext4 volume's `lost+found`, unreadable to the agent's user, stopped every change from
    /// being read, and the agent from starting), and the objects of its files stay as last
    /// read; a symlink back up the tree is listed once, not followed round (each file was read
    /// 40 times, under `loop/loop/…`, until the kernel's limit on symlinks in a path).
    #[test]
    fn an_unlistable_sub_folder_or_a_loop_does_not_stop_the_others() {
        let (folder, _file, mut index, mut source) = a_service_file("file-sub-folders");
        std::os::unix::fs::symlink(".", folder.join("loop")).unwrap();
        let locked = folder.join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::write(
            locked.join("more.yaml"),
            SERVICE.replace("echo", "more").replace(".10", ".11"),
        )
        .unwrap();
        assert_eq!(pass(&mut source, &mut index), (0, true));
        assert_eq!(source.files.len(), 2, "{:?}", source.files.keys());
        let more = ObjectKey::new("ns", "more");
        let served = |index: &Index| index.snapshot().frontend_of(&more, 80).is_some();
        assert!(served(&index));
        source.list = all_but_locked;
        let (problems, echo_served) = pass(&mut source, &mut index);
        assert!(problems > 0 && echo_served);
        assert!(served(&index), "its files' objects stay");
        let (updates, problems) = source.changes().unwrap();
        assert!(updates.is_empty(), "nothing changed");
        assert!(problems.is_empty(), "told once: {problems:?}");
        // Listed again, then not: told again.
        source.list = list_dir;
        assert_eq!(pass(&mut source, &mut index), (0, true));
        source.list = all_but_locked;
        let (_, problems) = source.changes().unwrap();
        assert!(
            problems[0]
                .to_string()
                .contains("cannot list this sub-folder"),
            "{problems:?}"
        );
    }

    /// A file renamed keeps serving its objects: gone under its old name a poll before its new
    /// name is read, they stay meanwhile. Before, they left the table for that poll.
    #[test]
    fn a_renamed_file_keeps_its_objects() {
        let (folder, file, mut index, mut source) = a_service_file("file-rename");
        assert!(poll(&mut source, &mut index));
        std::fs::rename(&file, folder.join("moved.yaml")).unwrap();
        assert!(
            poll(&mut source, &mut index),
            "renamed, not read yet: still served"
        );
        assert!(poll(&mut source, &mut index), "read under its new name");
        assert!(poll(&mut source, &mut index), "the old name forgotten");
        std::fs::remove_file(folder.join("moved.yaml")).unwrap();
        assert!(
            !poll(&mut source, &mut index),
            "removed: its objects go at once"
        );
    }

    /// A file being written (truncated, then filled) is read once it held still for a poll:
    /// its objects stay meanwhile. Before, a poll between the two deleted them.
    #[test]
    fn a_file_being_written_is_read_once_it_held_still() {
        let (_folder, file, mut index, mut source) = a_service_file("file-settle");
        assert!(
            poll(&mut source, &mut index),
            "the first poll reads the folder as it is"
        );
        std::fs::write(&file, "").unwrap();
        assert!(poll(&mut source, &mut index), "truncated, not read yet");
        assert!(
            poll(&mut source, &mut index),
            "empty for a poll: the writer may still wait for what it writes"
        );
        std::fs::write(&file, SERVICE.replace("echo", "other")).unwrap();
        assert!(poll(&mut source, &mut index), "written again, not read yet");
        assert!(!poll(&mut source, &mut index), "held still: read");
    }

    /// A rewrite of the same length that keeps the modification time (`cp -p`) is a change.
    #[test]
    fn a_rewrite_that_keeps_length_and_modification_time_is_read() {
        let (_folder, file, mut index, mut source) = a_service_file("file-stamp");
        assert_eq!(pass(&mut source, &mut index), (0, true));
        let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::fs::write(&file, SERVICE.replace("echo", "ecco")).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(modified)
            .unwrap();
        assert_eq!(pass(&mut source, &mut index), (0, false));
    }

    /// A ConfigMap mounted as a folder: each file is read once, through its visible name.
    #[test]
    fn a_configmap_folder_is_read_through_its_visible_names() {
        let folder = TestDir::new("file-configmap");
        let version = folder.join("..2026_12_06_01_00_00.1");
        std::fs::create_dir(&version).unwrap();
        std::fs::write(
            version.join("svc.yaml"),
            "kind: [unclosed
",
        )
        .unwrap();
        std::os::unix::fs::symlink("..2026_12_06_01_00_00.1", folder.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/svc.yaml", folder.join("svc.yaml")).unwrap();
        let mut index = Index::new();
        let mut source = ManifestDir::new(&*folder);
        assert_eq!(
            pass(&mut source, &mut index),
            (1, false),
            "one problem, not three"
        );
    }

    #[test]
    fn broken_file_keeps_last_good_objects() {
        let folder = TestDir::new("file-source");
        let dir: &Path = &folder;
        let file = dir.join("svc.yaml");
        std::fs::write(&file, SERVICE).unwrap();
        let mut index = Index::new();
        let mut source = ManifestDir::new(dir);
        assert_eq!(pass(&mut source, &mut index), (0, true));
        // Unparseable YAML: reported, the Service stays.
        std::fs::write(&file, "kind: [unclosed\n  more: x").unwrap();
        assert_eq!(pass(&mut source, &mut index), (1, true));
        // An invalid version of the same object: reported, the last good one stays.
        std::fs::write(&file, SERVICE.replace("port: 80", "port: 0")).unwrap();
        assert_eq!(pass(&mut source, &mut index), (1, true));
        // File removed: its objects go.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(pass(&mut source, &mut index), (0, false));
    }

    /// The folder is one set of objects, whichever file holds each: an object moved to a file
    /// read earlier, or declared twice and removed from one file, stays.
    #[test]
    fn an_object_moved_between_files_stays() {
        let folder = TestDir::new("file-moved");
        let dir: &Path = &folder;
        let (a, b) = (dir.join("a.yaml"), dir.join("b.yaml"));
        std::fs::write(&b, SERVICE).unwrap();
        let mut index = Index::new();
        let mut source = ManifestDir::new(dir);
        assert_eq!(pass(&mut source, &mut index), (0, true));
        std::fs::write(&a, SERVICE).unwrap();
        std::fs::write(&b, "").unwrap();
        assert_eq!(pass(&mut source, &mut index), (0, true), "moved to a.yaml");
        std::fs::write(&b, SERVICE).unwrap();
        assert_eq!(pass(&mut source, &mut index), (0, true));
        std::fs::remove_file(&a).unwrap();
        assert_eq!(pass(&mut source, &mut index), (0, true), "still in b.yaml");
        assert!(source.changes().unwrap().0.is_empty(), "nothing changed");
        std::fs::remove_file(&b).unwrap();
        assert_eq!(pass(&mut source, &mut index), (0, false));
    }

    /// A cluster-scoped object (a Namespace) keeps its last good version too.
    #[test]
    fn an_invalid_namespace_keeps_its_last_good_version() {
        let folder = TestDir::new("file-namespace");
        let dir: &Path = &folder;
        let namespace = dir.join("namespace.yaml");
        let opted_in = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team\n  annotations: {gamma-node.io/local-sockets: \"true\"}\n";
        std::fs::write(&namespace, opted_in).unwrap();
        std::fs::write(
            dir.join("pod.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: team}\nstatus: {podIP: 10.0.0.1}\n",
        )
        .unwrap();
        let mut index = Index::new();
        let mut source = ManifestDir::new(dir);
        let mut local_sockets = |source: &mut ManifestDir| {
            let (problems, _) = pass(source, &mut index);
            let caller = index
                .snapshot()
                .caller("10.0.0.1".parse().unwrap())
                .cloned();
            (problems, caller.expect("the pod is a caller").local_sockets)
        };
        assert_eq!(local_sockets(&mut source), (0, true));
        // Unquoted, the annotation's value is a boolean: not an annotation Kubernetes takes.
        std::fs::write(&namespace, opted_in.replace("\"true\"", "true")).unwrap();
        assert_eq!(
            local_sockets(&mut source),
            (1, true),
            "the last good version stays"
        );
        std::fs::remove_file(&namespace).unwrap();
        assert_eq!(local_sockets(&mut source), (0, false));
    }
}
