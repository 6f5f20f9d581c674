//! `cargo xtask check-deploy`: the Kubernetes manifests under `deploy/` against the agent binary.
//!
//! Every manifest file is parsed (an error names the file, the document and the field). Every
//! kustomization is rendered by `kubectl kustomize` (kustomize's own error fails the check); its
//! output does not say which file an object came from, so messages name rendered objects by kind,
//! namespace and name. Each rendering is then checked against what the binary says about itself
//! (`proxy-agent --print-rbac`, `proxy-agent --print-flags`):
//!
//! - (a) rbac: the ClusterRoles and Roles bound to the DaemonSet's ServiceAccount grant exactly the
//!   API calls of `--print-rbac` (leases in the agent's namespace only), naming missing and excess
//!   grants;
//! - (b) flags: every argument is a flag `--print-flags` lists, with a value exactly when it takes
//!   one; every `$(VAR)` is an env var of the container; every ConfigMap key it reads exists;
//! - (c) probes: liveness and startup on /live, readiness on /ready, at the `--admin` host and port;
//!   declared ports agree with `--admin` and `--redirect`; Prometheus's pod annotations lead to
//!   the `--metrics` listener;
//! - (d) image: the agent's image is the one the `images:` rules of the kustomization and its
//!   bases set (read from the kustomization files), and each of the kustomization's own rules
//!   shows in the rendering (in the base: the agent's version; beside a demo script: the image
//!   the script builds);
//! - (e) grace: terminationGracePeriodSeconds covers `--drain-timeout-s` and the 7 s the rest
//!   of a shutdown takes;
//! - (f) security: not privileged, read-only root filesystem, capabilities drop ALL and add exactly
//!   [`DOCUMENTED_CAPABILITIES`], host paths read-only but the takeover socket's folder, no
//!   hostPID/hostIPC;
//! - (g) cgroup: `--cgroup` resolves to a directory under the host's /sys/fs/cgroup, mounted there;
//! - (h) takeover: with `--takeover-socket`, an update starts the new pod beside the old one
//!   (maxSurge ≥ 1, maxUnavailable 0, no container ports: on the host network they are host ports,
//!   which the surge pod could not get), the socket's folder is a writable host path both pods
//!   see, `--after-takeover=wait` (an old container that exited would be restarted and take
//!   over back), and POD_NAME from the downward API (the two agents of a node tell themselves
//!   apart by it in the status lease); without it, no surge (the new agent could not bind the
//!   node's ports).

use crate::util;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_yaml_ng::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

const USAGE: &str = "\
usage: cargo xtask check-deploy [--agent BIN] [--rbac-json FILE] [--flags-json FILE]

Checks every manifest under deploy/ against the agent; each kustomization is rendered with
`kubectl kustomize` (`cargo xtask setup` installs kubectl). By default the agent's API calls and
flags come from `cargo run -q -p proxy-agent -- --print-rbac` and `-- --print-flags`.
  --agent BIN        run this proxy-agent binary instead
  --rbac-json FILE   the API calls, as `proxy-agent --print-rbac` prints them: a JSON array of
                     {\"apiGroup\": \"...\", \"resource\": \"...\", \"verbs\": [\"...\"]}
  --flags-json FILE  the flags, as `proxy-agent --print-flags` prints them: a JSON array of
                     {\"name\": \"admin\", \"takesValue\": true, \"default\": \"...\" or null}
";

/// The capabilities the agent's container adds, and why; deploy/base/daemonset.yaml says the same.
/// CAP_BPF and CAP_PERFMON are not listed: the kernel accepts CAP_SYS_ADMIN wherever it asks for them.
pub const DOCUMENTED_CAPABILITIES: &[(&str, &str)] = &[
    (
        "NET_ADMIN",
        "loading cgroup sock_addr/sock_ops programs, creating the SOCKMAP and BPF_PROG_QUERY on the \
         cgroup (older kernels accept only CAP_NET_ADMIN for the last two)",
    ),
    (
        "SYS_ADMIN",
        "finding and detaching a predecessor's programs on the cgroup (BPF_PROG_GET_NEXT_ID, \
         BPF_LINK_GET_FD_BY_ID: CAP_SYS_ADMIN only)",
    ),
];

/// API resources the agent uses only in its own namespace (POD_NAMESPACE): granted by a Role there.
const OWN_NAMESPACE_RESOURCES: &[(&str, &str)] = &[("coordination.k8s.io", "leases")];

/// The host's cgroup v2 hierarchy, which the agent must see at the same path.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Kubernetes' default when terminationGracePeriodSeconds is not set.
const DEFAULT_GRACE_SECONDS: i64 = 30;

pub fn run(args: &[String]) -> Result<()> {
    let Some(options) = Options::parse(args)? else {
        print!("{USAGE}");
        return Ok(());
    };
    let root = util::workspace_root();
    let facts = AgentFacts::gather(&options, &root);
    let mut report = Report::default();
    check_folder(&root, &facts, &mut report)?;
    println!(
        "check-deploy: {} passed, {} failed",
        report.passed, report.failed
    );
    if report.failed > 0 {
        bail!(
            "{} deploy check(s) failed (details above; each names the file and field)",
            report.failed
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Options and what the agent says about itself

#[derive(Default, Debug)]
struct Options {
    agent: Option<PathBuf>,
    rbac_json: Option<PathBuf>,
    flags_json: Option<PathBuf>,
}

impl Options {
    /// `None` for --help.
    fn parse(args: &[String]) -> Result<Option<Self>> {
        let mut options = Options::default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) => (flag, Some(value.to_owned())),
                None => (arg.as_str(), None),
            };
            if matches!(flag, "-h" | "--help") {
                return Ok(None);
            }
            let slot = match flag {
                "--agent" => &mut options.agent,
                "--rbac-json" => &mut options.rbac_json,
                "--flags-json" => &mut options.flags_json,
                other => bail!("check-deploy: unknown option `{other}`\n{USAGE}"),
            };
            let value = inline
                .or_else(|| args.next().cloned())
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
            *slot = Some(PathBuf::from(value));
        }
        Ok(Some(options))
    }
}

/// One API call of the agent, as `proxy-agent --print-rbac` prints it.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiCall {
    #[serde(rename = "apiGroup")]
    pub api_group: String,
    pub resource: String,
    pub verbs: Vec<String>,
}

/// A long flag of the agent, as `proxy-agent --print-flags` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FlagInfo {
    takes_value: bool,
    default: Option<String>,
}

/// The agent's long flags by name (without the leading `--`).
type AgentFlags = BTreeMap<String, FlagInfo>;

struct AgentFacts {
    /// Where the facts came from, for the report.
    origin: String,
    flags: Result<AgentFlags, String>,
    rbac: Result<Vec<ApiCall>, String>,
    version: Result<String, String>,
}

impl AgentFacts {
    fn gather(options: &Options, root: &Path) -> Self {
        let run_agent = |arg: &str| -> Result<String, String> {
            let mut command = match &options.agent {
                Some(binary) => Command::new(binary),
                None => {
                    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
                    let mut c = Command::new(cargo);
                    c.args(["run", "-q", "-p", "proxy-agent", "--"]);
                    c.current_dir(root);
                    c
                }
            };
            command.arg(arg);
            util::output(&mut command).map_err(|e| format!("{e:#}"))
        };
        let origin = match &options.agent {
            Some(binary) => binary.display().to_string(),
            None => "`cargo run -q -p proxy-agent`".into(),
        };
        let flags = match &options.flags_json {
            Some(file) => read(file),
            None => run_agent("--print-flags"),
        }
        .and_then(|json| parse_flags_json(&json));
        let rbac = match &options.rbac_json {
            Some(file) => read(file),
            None => run_agent("--print-rbac").map_err(|e| {
                format!(
                    "{e}\n         (until the agent has --print-rbac, pass its API calls with \
                     --rbac-json FILE)"
                )
            }),
        }
        .and_then(|json| parse_rbac_json(&json));
        AgentFacts {
            origin,
            flags,
            rbac,
            version: agent_version(root),
        }
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

fn parse_rbac_json(json: &str) -> Result<Vec<ApiCall>, String> {
    let calls: Vec<ApiCall> = serde_json::from_str(json)
        .map_err(|e| format!("the --print-rbac JSON does not parse: {e}"))?;
    if let Some(call) = calls.iter().find(|c| c.verbs.is_empty()) {
        return Err(format!(
            "the --print-rbac JSON lists {} with no verbs",
            resource_name(&call.api_group, &call.resource)
        ));
    }
    Ok(calls)
}

/// The flags of `proxy-agent --print-flags`: a JSON array of
/// {"name": "admin", "takesValue": true, "default": "127.0.0.1:15000" | null}.
fn parse_flags_json(json: &str) -> Result<AgentFlags, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Entry {
        name: String,
        takes_value: bool,
        default: Option<String>,
    }
    let entries: Vec<Entry> = serde_json::from_str(json)
        .map_err(|e| format!("the --print-flags JSON does not parse: {e}"))?;
    let mut flags = AgentFlags::new();
    for entry in entries {
        let info = FlagInfo {
            takes_value: entry.takes_value,
            default: entry.default,
        };
        if flags.insert(entry.name.clone(), info).is_some() {
            return Err(format!(
                "the --print-flags JSON lists --{} twice",
                entry.name
            ));
        }
    }
    Ok(flags)
}

/// proxy-agent's version, from its Cargo.toml.
fn agent_version(root: &Path) -> Result<String, String> {
    let manifest = root.join("proxy-agent/Cargo.toml");
    let text = read(&manifest)?;
    let mut in_package = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if let Some(value) = line.strip_prefix("version").filter(|_| in_package) {
            if let Some(version) = value.trim().strip_prefix('=') {
                return Ok(version.trim().trim_matches('"').to_owned());
            }
        }
    }
    Err(format!("{} has no [package] version", manifest.display()))
}

// ---------------------------------------------------------------------------------------------
// Report

type Outcome = Result<String, Vec<String>>;

#[derive(Default)]
struct Report {
    passed: usize,
    failed: usize,
}

impl Report {
    fn record(&mut self, label: &str, outcome: Outcome) {
        match outcome {
            Ok(summary) => {
                self.passed += 1;
                println!("PASS {label}: {summary}");
            }
            Err(problems) => {
                self.failed += 1;
                println!("FAIL {label}:");
                for problem in problems {
                    println!("       - {problem}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Manifests: documents and fields with their location

#[derive(Clone, Debug)]
struct Doc {
    /// "deploy/base/rbac.yaml, document 2" for a file's document; "DaemonSet gamma-system/gamma-node"
    /// for a rendered object (kustomize does not say which file it came from).
    source: String,
    value: Value,
}

impl Doc {
    fn root(&self) -> Node<'_> {
        Node {
            doc: self,
            value: &self.value,
            path: String::new(),
        }
    }

    fn kind(&self) -> &str {
        self.value.get("kind").and_then(Value::as_str).unwrap_or("")
    }

    fn name(&self) -> &str {
        self.meta("name")
    }

    fn namespace(&self) -> &str {
        self.meta("namespace")
    }

    fn meta(&self, field: &str) -> &str {
        self.value
            .get("metadata")
            .and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    fn describe(&self) -> String {
        match self.namespace() {
            "" => format!("{} {}", self.kind(), self.name()),
            ns => format!("{} {ns}/{}", self.kind(), self.name()),
        }
    }
}

/// A field of a document, with its path for error messages.
#[derive(Clone)]
struct Node<'a> {
    doc: &'a Doc,
    value: &'a Value,
    path: String,
}

impl<'a> Node<'a> {
    fn err(&self, message: impl std::fmt::Display) -> String {
        let path = if self.path.is_empty() {
            "(the document)"
        } else {
            &self.path
        };
        format!("{}, {path}: {message}", self.doc.source)
    }

    fn child(&self, key: &str, value: &'a Value) -> Node<'a> {
        let path = if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        };
        Node {
            doc: self.doc,
            value,
            path,
        }
    }

    /// The field `key` of this mapping; `None` if absent or null.
    fn get(&self, key: &str) -> Result<Option<Node<'a>>, String> {
        let map = self
            .value
            .as_mapping()
            .ok_or_else(|| self.err("expected a mapping"))?;
        Ok(map
            .get(key)
            .filter(|v| !v.is_null())
            .map(|v| self.child(key, v)))
    }

    fn req(&self, key: &str) -> Result<Node<'a>, String> {
        self.get(key)?
            .ok_or_else(|| self.child(key, &Value::Null).err("missing"))
    }

    fn str(&self) -> Result<&'a str, String> {
        self.value
            .as_str()
            .ok_or_else(|| self.err("expected a string"))
    }

    fn int(&self) -> Result<i64, String> {
        self.value
            .as_i64()
            .ok_or_else(|| self.err("expected an integer"))
    }

    fn bool(&self) -> Result<bool, String> {
        self.value
            .as_bool()
            .ok_or_else(|| self.err("expected true or false"))
    }

    fn items(&self) -> Result<Vec<Node<'a>>, String> {
        let seq = self
            .value
            .as_sequence()
            .ok_or_else(|| self.err("expected a list"))?;
        Ok(seq
            .iter()
            .enumerate()
            .map(|(i, v)| Node {
                doc: self.doc,
                value: v,
                path: format!("{}[{i}]", self.path),
            })
            .collect())
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, String> {
        self.get(key)?.map(|n| n.str()).transpose()
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, String> {
        self.get(key)?.map(|n| n.bool()).transpose()
    }

    fn list(&self, key: &str) -> Result<Vec<Node<'a>>, String> {
        Ok(match self.get(key)? {
            Some(n) => n.items()?,
            None => Vec::new(),
        })
    }

    fn str_list(&self, key: &str) -> Result<Vec<&'a str>, String> {
        self.list(key)?.iter().map(Node::str).collect()
    }
}

fn display(path: &Path, root: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The documents of a YAML file (empty documents skipped).
fn parse_documents(text: &str, file: &str) -> Result<Vec<Doc>, String> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let source = format!("{file}, document {}", i + 1);
        let value = Value::deserialize(de).map_err(|e| format!("{source}: {e}"))?;
        if !value.is_null() {
            docs.push(Doc { source, value });
        }
    }
    Ok(docs)
}

/// Configuration files that are not Kubernetes objects (no metadata.name).
fn is_config_file(doc: &Doc) -> bool {
    let api_version = doc
        .value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    api_version.starts_with("kustomize.config.k8s.io/") || api_version.starts_with("kind.x-k8s.io/")
}

/// Parses every YAML file under `dir`: each document must be an object with apiVersion, kind and
/// metadata.name (configuration files need no metadata).
fn parse_all(dir: &Path, root: &Path) -> Outcome {
    let mut files = Vec::new();
    collect_yaml(dir, &mut files).map_err(|e| vec![format!("{}: {e}", dir.display())])?;
    let mut problems = Vec::new();
    let mut documents = 0;
    for file in &files {
        let name = display(file, root);
        let docs = match read(file).and_then(|text| parse_documents(&text, &name)) {
            Ok(docs) => docs,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        documents += docs.len();
        for doc in &docs {
            let node = doc.root();
            let mut fields = vec!["apiVersion", "kind"];
            if !is_config_file(doc) {
                fields.push("metadata");
            }
            for field in fields {
                if let Err(e) = node.req(field).and_then(|n| match field {
                    "metadata" => n.req("name").and_then(|n| n.str()).map(drop),
                    _ => n.str().map(drop),
                }) {
                    problems.push(e);
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(format!(
            "{} files, {documents} documents under {}",
            files.len(),
            display(dir, root)
        ))
    } else {
        Err(problems)
    }
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_yaml(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Rendering: `kubectl kustomize`, and the `images:` rules read from the kustomizations

fn kustomization_file(dir: &Path) -> Option<PathBuf> {
    ["kustomization.yaml", "kustomization.yml", "Kustomization"]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

/// `kubectl kustomize DIR`: the rendered multi-document YAML, or why there is none (kustomize's
/// stderr when it refuses the kustomization).
pub fn kustomize(dir: &Path) -> Result<String, String> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "kubectl is not installed: run `cargo xtask setup` \
                                             (it installs kubectl, which bundles kustomize)"
                .to_owned(),
            _ => format!("could not run kubectl kustomize: {e}"),
        })?;
    if !out.status.success() {
        return Err(format!(
            "kubectl kustomize {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The objects kustomize makes of the kustomization in `dir`. Its output does not say which file
/// an object came from, so each is named by its kind, namespace and name.
fn render(dir: &Path, root: &Path) -> Result<Vec<Doc>, String> {
    let yaml = kustomize(dir)?;
    parse_rendered(
        &yaml,
        &format!("the output of kubectl kustomize {}", display(dir, root)),
    )
}

/// The documents of rendered YAML, named by kind, namespace and name; `origin` names the YAML
/// in parse errors.
fn parse_rendered(yaml: &str, origin: &str) -> Result<Vec<Doc>, String> {
    let docs = parse_documents(yaml, origin)?;
    Ok(docs
        .into_iter()
        .map(|mut doc| {
            doc.source = doc.describe();
            doc
        })
        .collect())
}

/// An `images:` entry of a kustomization.
#[derive(Debug, Clone)]
struct ImageRule {
    /// "deploy/kind/kustomization.yaml, images[0]".
    source: String,
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
    digest: Option<String>,
}

impl ImageRule {
    /// The name of the images this rule rewrites, once rewritten.
    fn new_image_name(&self) -> &str {
        self.new_name.as_deref().unwrap_or(&self.name)
    }

    /// Whether `image` has the name, tag and digest this rule gives the images it matches.
    fn produces(&self, image: &str) -> bool {
        let (name, tag, digest) = split_image(image);
        name == self.new_image_name()
            && self.new_tag.as_deref().is_none_or(|t| tag == Some(t))
            && self.digest.as_deref().is_none_or(|d| digest == Some(d))
    }

    /// What the rule makes of an image, for messages: `name[:tag][@digest]`.
    fn new_image(&self) -> String {
        let mut image = self.new_image_name().to_owned();
        if let Some(tag) = &self.new_tag {
            image += &format!(":{tag}");
        }
        if let Some(digest) = &self.digest {
            image += &format!("@{digest}");
        }
        image
    }
}

/// What check (d) needs of a kustomization file: its `images:` rules and the local folders it
/// builds on (`resources` and `components`; remote ones are kustomize's business alone).
struct Kustomization {
    images: Vec<ImageRule>,
    bases: Vec<PathBuf>,
}

impl Kustomization {
    fn read(dir: &Path, root: &Path) -> Result<Self, String> {
        let file = kustomization_file(dir)
            .ok_or_else(|| format!("{}: no kustomization.yaml", display(dir, root)))?;
        let name = display(&file, root);
        let docs = parse_documents(&read(&file)?, &name)?;
        let [kustomization] = docs.as_slice() else {
            return Err(format!("{name}: expected one document"));
        };
        let k = kustomization.root();
        let mut images = Vec::new();
        for entry in k.list("images")? {
            images.push(ImageRule {
                source: format!("{name}, {}", entry.path),
                name: entry.req("name")?.str()?.to_owned(),
                new_name: entry.opt_str("newName")?.map(str::to_owned),
                new_tag: entry.opt_str("newTag")?.map(str::to_owned),
                digest: entry.opt_str("digest")?.map(str::to_owned),
            });
        }
        let mut bases = Vec::new();
        for field in ["resources", "components"] {
            for entry in k.str_list(field)? {
                let path = dir.join(entry);
                if path.is_dir() {
                    bases.push(path);
                }
            }
        }
        Ok(Kustomization { images, bases })
    }

    /// Its own `images:` rules, then its bases', outermost first: kustomize applies a base's rules
    /// before the kustomization's, so the first rule naming an image is the last to set it.
    fn image_rules_with_bases(&self, root: &Path) -> Result<Vec<ImageRule>, String> {
        let mut rules = self.images.clone();
        for base in &self.bases {
            rules.extend(Kustomization::read(base, root)?.image_rules_with_bases(root)?);
        }
        Ok(rules)
    }
}

/// Splits an image reference into name, tag and digest.
fn split_image(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    let last = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[last..].rfind(':') {
        Some(i) => (&rest[..last + i], Some(&rest[last + i + 1..]), digest),
        None => (rest, None, digest),
    }
}

/// The images of every `containers` and `initContainers` list in `value`, wherever it is nested
/// (kustomize's image transformer looks at them in any kind of object).
fn container_images<'a>(value: &'a Value, images: &mut Vec<&'a str>) {
    match value {
        Value::Mapping(map) => {
            for (key, child) in map {
                if matches!(key.as_str(), Some("containers" | "initContainers")) {
                    let containers = child.as_sequence().into_iter().flatten();
                    images.extend(containers.filter_map(|c| c.get("image")?.as_str()));
                }
                container_images(child, images);
            }
        }
        Value::Sequence(items) => items.iter().for_each(|v| container_images(v, images)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// The checks

/// Parses every manifest under deploy/, then renders and checks every kustomization.
fn check_folder(root: &Path, facts: &AgentFacts, report: &mut Report) -> Result<()> {
    let deploy = root.join("deploy");
    if !deploy.is_dir() {
        bail!("{} does not exist", deploy.display());
    }
    println!(
        "check-deploy: the manifests under deploy/ against {}",
        facts.origin
    );
    report.record("parse", parse_all(&deploy, root));
    let mut dirs = Vec::new();
    find_kustomizations(&deploy, &mut dirs)?;
    for dir in dirs {
        let label = display(&dir, root);
        match render(&dir, root) {
            Ok(docs) => {
                report.record(
                    &format!("{label}: render"),
                    Ok(format!("{} objects (kubectl kustomize)", docs.len())),
                );
                for (name, outcome) in check_rendered(&dir, root, &docs, facts) {
                    report.record(&format!("{label}: {name}"), outcome);
                }
            }
            Err(problem) => report.record(&format!("{label}: render"), Err(vec![problem])),
        }
    }
    Ok(())
}

fn find_kustomizations(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if kustomization_file(dir).is_some() {
        out.push(dir.to_owned());
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    for entry in entries {
        find_kustomizations(&entry, out)?;
    }
    Ok(())
}

/// Where a container's env var comes from.
#[derive(Debug, Clone, PartialEq)]
enum EnvSource {
    Literal(String),
    /// The downward API: known only at run time.
    Field(String),
    ConfigMap(String),
    /// A ConfigMap key that is not in the rendered manifests, or another source.
    Unknown(String),
}

/// The DaemonSet's agent container and what the checks need to know about it.
struct Agent<'a> {
    daemonset: &'a Doc,
    pod_spec: Node<'a>,
    container: Node<'a>,
    args: Vec<Node<'a>>,
    env: BTreeMap<String, EnvSource>,
    /// Problems found while reading the env (for the flags check).
    env_problems: Vec<String>,
}

impl<'a> Agent<'a> {
    fn find(docs: &'a [Doc]) -> Result<Self, String> {
        let daemonsets: Vec<&Doc> = docs.iter().filter(|d| d.kind() == "DaemonSet").collect();
        let [daemonset] = daemonsets[..] else {
            return Err(format!(
                "expected one DaemonSet, found {}",
                daemonsets.len()
            ));
        };
        let pod_spec = daemonset
            .root()
            .req("spec")
            .and_then(|s| s.req("template"))
            .and_then(|t| t.req("spec"))?;
        let containers = pod_spec.req("containers")?.items()?;
        let container = match containers.as_slice() {
            [only] => only.clone(),
            many => many
                .iter()
                .find(|c| c.opt_str("name").ok().flatten() == Some("proxy-agent"))
                .cloned()
                .ok_or_else(|| pod_spec.err("no container named proxy-agent"))?,
        };
        let args = container.list("args")?;
        let mut env = BTreeMap::new();
        let mut env_problems = Vec::new();
        let namespace = daemonset.namespace();
        for var in container.list("env")? {
            let name = var.req("name")?.str()?.to_owned();
            let source = match (var.opt_str("value")?, var.get("valueFrom")?) {
                (Some(value), _) => EnvSource::Literal(value.to_owned()),
                (None, Some(from)) => {
                    if let Some(field) = from.get("fieldRef")? {
                        EnvSource::Field(field.req("fieldPath")?.str()?.to_owned())
                    } else if let Some(key_ref) = from.get("configMapKeyRef")? {
                        let cm = key_ref.req("name")?.str()?;
                        let key = key_ref.req("key")?.str()?;
                        match config_map_value(docs, namespace, cm, key) {
                            Some(value) => EnvSource::ConfigMap(value),
                            None => {
                                env_problems.push(key_ref.err(format!(
                                    "no key {key} in a ConfigMap {namespace}/{cm} of the \
                                     rendered manifests"
                                )));
                                EnvSource::Unknown(format!("{cm}/{key}"))
                            }
                        }
                    } else {
                        EnvSource::Unknown(from.path.clone())
                    }
                }
                (None, None) => EnvSource::Literal(String::new()),
            };
            env.insert(name, source);
        }
        Ok(Agent {
            daemonset,
            pod_spec,
            container,
            args,
            env,
            env_problems,
        })
    }

    /// The flags of the args as (name, value): `--x=v`, or `--x v` when the next arg is no flag.
    fn flags(&self) -> Vec<(String, Option<String>)> {
        let args: Vec<&str> = self.args.iter().filter_map(|a| a.value.as_str()).collect();
        let mut flags = Vec::new();
        let mut i = 0;
        while i < args.len() {
            if let Some(flag) = args[i].strip_prefix("--") {
                match flag.split_once('=') {
                    Some((name, value)) => flags.push((name.to_owned(), Some(value.to_owned()))),
                    None => {
                        let value = args.get(i + 1).filter(|v| !v.starts_with('-'));
                        flags.push((flag.to_owned(), value.map(|v| (*v).to_owned())));
                        i += usize::from(value.is_some());
                    }
                }
            }
            i += 1;
        }
        flags
    }

    /// The value of `--name`, else its default from `--print-flags`; `$(VAR)`s expanded where
    /// the manifests know their value.
    fn flag_value(&self, name: &str, agent_flags: Option<&AgentFlags>) -> Option<String> {
        let explicit = self
            .flags()
            .into_iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v);
        explicit
            .or_else(|| {
                agent_flags
                    .and_then(|flags| flags.get(name))
                    .and_then(|f| f.default.clone())
            })
            .map(|v| self.expand(&v))
    }

    /// Replaces `$(VAR)` by the env var's value; run-time values become `<fieldPath>`.
    fn expand(&self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("$(") {
            out.push_str(&rest[..start]);
            let Some(end) = rest[start..].find(')') else {
                break;
            };
            let name = &rest[start + 2..start + end];
            match self.env.get(name) {
                Some(EnvSource::Literal(v) | EnvSource::ConfigMap(v)) => out.push_str(v),
                Some(EnvSource::Field(f)) => out.push_str(&format!("<{f}>")),
                _ => out.push_str(&rest[start..start + end + 1]),
            }
            rest = &rest[start + end + 1..];
        }
        out.push_str(rest);
        out
    }
}

fn config_map_value(docs: &[Doc], namespace: &str, name: &str, key: &str) -> Option<String> {
    docs.iter()
        .find(|d| d.kind() == "ConfigMap" && d.name() == name && d.namespace() == namespace)
        .and_then(|d| d.value.get("data"))
        .and_then(|data| data.get(key))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn check_rendered(
    dir: &Path,
    root: &Path,
    docs: &[Doc],
    facts: &AgentFacts,
) -> Vec<(&'static str, Outcome)> {
    let agent = match Agent::find(docs) {
        Ok(agent) => agent,
        Err(e) => return vec![("daemonset", Err(vec![e]))],
    };
    let agent_flags = facts.flags.as_ref().ok();
    vec![
        (
            "(a) rbac",
            facts
                .rbac
                .as_ref()
                .map_err(|e| vec![format!("no API calls to compare with: {e}")])
                .and_then(|calls| check_rbac(docs, &agent, calls, agent_flags)),
        ),
        (
            "(b) flags",
            facts
                .flags
                .as_ref()
                .map_err(|e| {
                    vec![format!(
                        "no `proxy-agent --print-flags` to compare with: {e}"
                    )]
                })
                .and_then(|flags| check_flags(&agent, flags)),
        ),
        ("(c) probes", check_probes(&agent, agent_flags)),
        (
            "(d) image",
            check_image(dir, root, docs, &agent, &facts.version),
        ),
        ("(e) grace", check_grace(&agent, agent_flags)),
        ("(f) security", check_security(&agent, agent_flags)),
        ("(g) cgroup", check_cgroup(&agent, agent_flags)),
        ("(h) takeover", check_takeover(&agent, agent_flags)),
    ]
}

fn outcome(problems: Vec<String>, summary: impl FnOnce() -> String) -> Outcome {
    if problems.is_empty() {
        Ok(summary())
    } else {
        Err(problems)
    }
}

// (a) ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Cluster,
    Namespace(String),
}

#[derive(Debug, Clone)]
struct Grant {
    scope: Scope,
    group: String,
    resource: String,
    verb: String,
    /// "ClusterRole gamma-node rules[2]".
    source: String,
}

fn resource_name(group: &str, resource: &str) -> String {
    if group.is_empty() {
        format!("core/{resource}")
    } else {
        format!("{group}/{resource}")
    }
}

fn scope_text(scope: &Scope) -> String {
    match scope {
        Scope::Cluster => "cluster-wide".into(),
        Scope::Namespace(ns) => format!("in namespace {ns}"),
    }
}

/// The grants the rendered RBAC objects give the ServiceAccount `namespace/name`. A rule that
/// names its objects (`resourceNames`) grants only what the agent asks of one object by name:
/// get and update of its status lease, `lease_name`; create, list and watch never match a name.
fn grants_of(
    docs: &[Doc],
    sa_namespace: &str,
    sa_name: &str,
    lease_name: &str,
    problems: &mut Vec<String>,
) -> Vec<Grant> {
    let mut grants = Vec::new();
    let mut bound: BTreeSet<(String, String, String)> = BTreeSet::new();
    for binding in docs
        .iter()
        .filter(|d| matches!(d.kind(), "ClusterRoleBinding" | "RoleBinding"))
    {
        let result = (|| -> Result<(), String> {
            let node = binding.root();
            let subjects = node.list("subjects")?;
            let mut ours = false;
            for subject in &subjects {
                let kind = subject.req("kind")?.str()?;
                let name = subject.req("name")?.str()?;
                let ns = subject.opt_str("namespace")?.unwrap_or(binding.namespace());
                if kind == "ServiceAccount" && name == sa_name && ns == sa_namespace {
                    ours = true;
                } else {
                    problems.push(subject.err(format!(
                        "excess: binds {kind} {ns}/{name}, not the agent's ServiceAccount \
                         {sa_namespace}/{sa_name}"
                    )));
                }
            }
            if !ours {
                return Ok(());
            }
            let role_ref = node.req("roleRef")?;
            let role_kind = role_ref.req("kind")?.str()?;
            let role_name = role_ref.req("name")?.str()?;
            let (scope, role_ns) = match (binding.kind(), role_kind) {
                ("ClusterRoleBinding", "ClusterRole") => (Scope::Cluster, ""),
                ("RoleBinding", "ClusterRole") => {
                    (Scope::Namespace(binding.namespace().to_owned()), "")
                }
                ("RoleBinding", "Role") => (
                    Scope::Namespace(binding.namespace().to_owned()),
                    binding.namespace(),
                ),
                (_, other) => return Err(role_ref.err(format!("cannot bind a {other}"))),
            };
            let role = docs
                .iter()
                .find(|d| {
                    d.kind() == role_kind && d.name() == role_name && d.namespace() == role_ns
                })
                .ok_or_else(|| {
                    role_ref.err(format!(
                        "{role_kind} {role_name} is not in the rendered manifests"
                    ))
                })?;
            bound.insert((
                role_kind.to_owned(),
                role_ns.to_owned(),
                role_name.to_owned(),
            ));
            for (i, rule) in role.root().list("rules")?.iter().enumerate() {
                let source = format!("{}, rules[{i}]", role.source);
                if rule.get("nonResourceURLs")?.is_some() {
                    problems.push(format!("excess: {source} grants nonResourceURLs"));
                }
                let groups = rule.str_list("apiGroups")?;
                let resources = rule.str_list("resources")?;
                let verbs = rule.str_list("verbs")?;
                for wildcard in [&groups, &resources, &verbs] {
                    if wildcard.contains(&"*") {
                        problems.push(format!("excess: {source} uses the wildcard `*`"));
                    }
                }
                // An empty list names every object, as no list does.
                let names = match rule.get("resourceNames")? {
                    Some(_) => Some(rule.str_list("resourceNames")?).filter(|n| !n.is_empty()),
                    None => None,
                };
                let by_name = |group: &str, resource: &str, verb: &str| {
                    (group, resource) == ("coordination.k8s.io", "leases")
                        && matches!(verb, "get" | "update")
                        && names.as_ref().is_some_and(|n| n.contains(&lease_name))
                };
                for group in &groups {
                    for resource in &resources {
                        for verb in &verbs {
                            if names.is_some() && !by_name(group, resource, verb) {
                                problems.push(format!(
                                    "ineffective: {source} grants {verb} {} only on the objects \
                                     its resourceNames list, which the agent's {verb} is not \
                                     limited to (a create, list or watch matches no name)",
                                    resource_name(group, resource)
                                ));
                                continue;
                            }
                            grants.push(Grant {
                                scope: scope.clone(),
                                group: (*group).to_owned(),
                                resource: (*resource).to_owned(),
                                verb: (*verb).to_owned(),
                                source: source.clone(),
                            });
                        }
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            problems.push(e);
        }
    }
    for role in docs
        .iter()
        .filter(|d| matches!(d.kind(), "ClusterRole" | "Role"))
    {
        let id = (
            role.kind().to_owned(),
            role.namespace().to_owned(),
            role.name().to_owned(),
        );
        if !bound.contains(&id) {
            problems.push(format!(
                "excess: {} is not bound to the agent's ServiceAccount {sa_namespace}/{sa_name}",
                role.describe()
            ));
        }
    }
    grants
}

/// Compares the grants with the agent's API calls: every call granted at its scope (leases in
/// the agent's namespace, the rest cluster-wide), and nothing else granted.
fn compare_rbac(grants: &[Grant], calls: &[ApiCall], agent_namespace: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let scope_of = |group: &str, resource: &str| {
        let base = resource.split('/').next().unwrap_or(resource);
        if OWN_NAMESPACE_RESOURCES.contains(&(group, base)) {
            Scope::Namespace(agent_namespace.to_owned())
        } else {
            Scope::Cluster
        }
    };
    let mut needed: BTreeSet<(Scope, String, String, String)> = BTreeSet::new();
    for call in calls {
        for verb in &call.verbs {
            needed.insert((
                scope_of(&call.api_group, &call.resource),
                call.api_group.clone(),
                call.resource.clone(),
                verb.clone(),
            ));
        }
    }
    for (scope, group, resource, verb) in &needed {
        let exact = grants.iter().any(|g| {
            &g.scope == scope && &g.group == group && &g.resource == resource && &g.verb == verb
        });
        if exact {
            continue;
        }
        let broader = grants.iter().find(|g| {
            g.scope == Scope::Cluster
                && &g.group == group
                && &g.resource == resource
                && &g.verb == verb
        });
        let fix = match scope {
            Scope::Cluster => "add it to the ClusterRole".to_owned(),
            Scope::Namespace(ns) => format!("add it to a Role in {ns}"),
        };
        if broader.is_none() {
            problems.push(format!(
                "missing: {verb} {} {} ({fix})",
                resource_name(group, resource),
                scope_text(scope)
            ));
        }
    }
    for grant in grants {
        let key = (
            grant.scope.clone(),
            grant.group.clone(),
            grant.resource.clone(),
            grant.verb.clone(),
        );
        if needed.contains(&key) {
            continue;
        }
        let narrower = needed.iter().find(|(scope, group, resource, verb)| {
            grant.scope == Scope::Cluster
                && scope != &Scope::Cluster
                && group == &grant.group
                && resource == &grant.resource
                && verb == &grant.verb
        });
        let name = resource_name(&grant.group, &grant.resource);
        problems.push(match narrower {
            Some((scope, ..)) => format!(
                "excess: {} grants {} {name} cluster-wide; the agent needs it only {} (use a Role)",
                grant.source,
                grant.verb,
                scope_text(scope)
            ),
            None => format!(
                "excess: {} grants {} {name} {}, which the agent never calls",
                grant.source,
                grant.verb,
                scope_text(&grant.scope)
            ),
        });
    }
    problems.sort();
    problems.dedup();
    problems
}

/// The namespace of the agent's lease: --lease-namespace, else $POD_NAMESPACE, else gamma-system
/// (the agent's own defaults).
fn lease_namespace(agent: &Agent<'_>) -> String {
    if let Some(ns) = agent.flag_value("lease-namespace", None) {
        return ns;
    }
    match agent.env.get("POD_NAMESPACE") {
        Some(EnvSource::Literal(ns) | EnvSource::ConfigMap(ns)) => ns.clone(),
        Some(EnvSource::Field(field)) if field == "metadata.namespace" => {
            agent.daemonset.namespace().to_owned()
        }
        Some(other) => format!("{other:?}"),
        None => "gamma-system".to_owned(),
    }
}

fn check_rbac(
    docs: &[Doc],
    agent: &Agent<'_>,
    calls: &[ApiCall],
    agent_flags: Option<&AgentFlags>,
) -> Outcome {
    let ds = agent.daemonset;
    let namespace = ds.namespace();
    if namespace.is_empty() {
        return Err(vec![format!(
            "{}: metadata.namespace is not set",
            ds.source
        )]);
    }
    let sa = match agent.pod_spec.opt_str("serviceAccountName") {
        Ok(name) => name.unwrap_or("default"),
        Err(e) => return Err(vec![e]),
    };
    let mut problems = Vec::new();
    if !docs
        .iter()
        .any(|d| d.kind() == "ServiceAccount" && d.name() == sa && d.namespace() == namespace)
    {
        problems.push(format!(
            "the DaemonSet runs as ServiceAccount {namespace}/{sa}, which is not in the manifests"
        ));
    }
    // The agent's own default when the args give none (unknown without its flags: no rule
    // naming objects then counts).
    let lease_name = agent
        .flag_value("lease-name", agent_flags)
        .unwrap_or_default();
    let grants = grants_of(docs, namespace, sa, &lease_name, &mut problems);
    problems.extend(compare_rbac(&grants, calls, &lease_namespace(agent)));
    problems.sort();
    problems.dedup();
    let verbs: usize = calls.iter().map(|c| c.verbs.len()).sum();
    outcome(problems, || {
        format!(
            "the roles bound to {namespace}/{sa} grant exactly the {verbs} verbs on {} resources \
             of --print-rbac",
            calls.len()
        )
    })
}

// (b) ---------------------------------------------------------------------------------------

fn check_flags(agent: &Agent<'_>, agent_flags: &AgentFlags) -> Outcome {
    let mut problems = agent.env_problems.clone();
    match agent.container.get("command") {
        Ok(Some(command)) => match command.items().and_then(|items| {
            items
                .first()
                .map(Node::str)
                .transpose()
                .map(|first| (first, items.len()))
        }) {
            Ok((Some(first), 1)) if first.rsplit('/').next() == Some("proxy-agent") => {}
            Ok(_) => problems.push(command.err("expected [proxy-agent] or no command")),
            Err(e) => problems.push(e),
        },
        Ok(None) => {}
        Err(e) => problems.push(e),
    }
    let mut i = 0;
    while i < agent.args.len() {
        let node = &agent.args[i];
        i += 1;
        let arg = match node.str() {
            Ok(arg) => arg,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        for name in references(arg) {
            if !agent.env.contains_key(name) {
                problems.push(node.err(format!(
                    "$({name}) is not an env var of the container: Kubernetes would pass it \
                     literally"
                )));
            }
        }
        let Some(flag) = arg.strip_prefix("--") else {
            problems.push(node.err(format!("`{arg}` is neither a long flag nor a flag's value")));
            continue;
        };
        let (name, inline) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (flag, None),
        };
        let Some(info) = agent_flags.get(name) else {
            problems.push(node.err(format!("proxy-agent --print-flags lists no --{name}")));
            continue;
        };
        match (info.takes_value, inline) {
            (true, None) => match agent.args.get(i).and_then(|n| n.value.as_str()) {
                Some(value) if !value.starts_with("--") => i += 1,
                _ => problems.push(node.err(format!("--{name} takes a value; none follows"))),
            },
            (false, Some(_)) => problems.push(node.err(format!("--{name} takes no value"))),
            _ => {}
        }
    }
    outcome(problems, || {
        format!(
            "{} args, every flag known to proxy-agent --print-flags, every $(VAR) an env var",
            agent.args.len()
        )
    })
}

/// The `$(NAME)` references in an arg (`$$(` is an escape).
fn references(arg: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        if start > 0 && rest.as_bytes()[start - 1] == b'$' {
            rest = &rest[start + 2..];
            continue;
        }
        let Some(end) = rest[start..].find(')') else {
            break;
        };
        names.push(&rest[start + 2..start + end]);
        rest = &rest[start + end + 1..];
    }
    names
}

// (c) ---------------------------------------------------------------------------------------

fn port_of(address: &str) -> Option<u16> {
    address.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

fn check_probes(agent: &Agent<'_>, agent_flags: Option<&AgentFlags>) -> Outcome {
    let Some(admin) = agent.flag_value("admin", agent_flags) else {
        return Err(vec![format!(
            "{}: no --admin in the args and no `proxy-agent --print-flags` for its default",
            agent.container.path
        )]);
    };
    let admin: SocketAddr = admin
        .parse()
        .map_err(|_| vec![format!("--admin `{admin}` is not an IP:port")])?;
    let mut problems = Vec::new();
    let container = &agent.container;
    let named_ports = container_ports(container).map_err(|e| vec![e])?;
    for (probe, path, required) in [
        ("livenessProbe", "/live", true),
        ("startupProbe", "/live", false),
    ] {
        if let Err(e) = check_probe(container, probe, path, required, admin, &named_ports) {
            problems.push(e);
        }
    }
    let readiness = match container.get("readinessProbe") {
        Ok(Some(probe)) if probe.get("exec").ok().flatten().is_some() => {
            check_ready_file_probe(agent, &probe, agent_flags)
        }
        _ if takeover_dir(agent, agent_flags).is_some() => Err(format!(
            "{}.readinessProbe: with --takeover-socket it must be the pod's own, an exec probe \
             `proxy-agent --probe-ready-file=F` of `--ready-file=F` in an emptyDir: both agents \
             of an update share the admin server's socket, where the old one answers /ready for \
             both until Stop",
            container.path
        )),
        _ => check_probe(
            container,
            "readinessProbe",
            "/ready",
            true,
            admin,
            &named_ports,
        ),
    };
    if let Err(e) = readiness {
        problems.push(e);
    }
    if let Some(port) = named_ports.get("admin") {
        if *port != admin.port() {
            problems.push(format!(
                "{}: the port named admin is {port}, --admin listens on {}",
                container.path,
                admin.port()
            ));
        }
    }
    let redirect = agent.flag_value("redirect", agent_flags);
    if let (Some(port), Some(redirect)) = (named_ports.get("redirect"), &redirect) {
        if port_of(redirect) != Some(*port) {
            problems.push(format!(
                "{}: the port named redirect is {port}, --redirect is {redirect}",
                container.path
            ));
        }
    }
    let metrics = agent.flag_value("metrics", agent_flags);
    problems.extend(check_scrape_annotations(agent, metrics.as_deref()));
    outcome(problems, || {
        let scraped = metrics.map_or(String::new(), |m| format!("; scraped at --metrics {m}"));
        format!("liveness/startup on /live at --admin {admin}, readiness the pod's own{scraped}")
    })
}

/// Whether every address of a `--metrics` value is a loopback one (`<status.hostIPs>`, a
/// run-time value, is not).
fn loopback_only(metrics: &str) -> bool {
    let Some((ips, _port)) = metrics.rsplit_once(':') else {
        return false;
    };
    let loopback = |ip: &str| {
        let bare = ip.trim().trim_start_matches('[').trim_end_matches(']');
        bare.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    };
    ips.split(',').all(loopback)
}

/// Prometheus's pod annotations, where the template has them, must lead to the `--metrics`
/// listener: the admin server's loopback is the node's, out of a scraper's reach.
fn check_scrape_annotations(agent: &Agent<'_>, metrics: Option<&str>) -> Vec<String> {
    let annotations = agent
        .daemonset
        .root()
        .req("spec")
        .and_then(|s| s.req("template"))
        .and_then(|t| t.get("metadata"))
        .and_then(|m| m.map(|m| m.get("annotations")).transpose())
        .map(Option::flatten);
    let annotations = match annotations {
        Ok(Some(annotations)) => annotations,
        Ok(None) => return Vec::new(),
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    let at = &annotations.path;
    let mut read = |key: &str| match annotations.opt_str(key) {
        Ok(value) => value,
        Err(e) => {
            // An unquoted number or boolean: the API server refuses the manifest.
            problems.push(format!("{e} (annotation values are strings: quote it)"));
            None
        }
    };
    let (scrape, port, path) = (
        read("prometheus.io/scrape"),
        read("prometheus.io/port"),
        read("prometheus.io/path"),
    );
    if let Some(metrics) = metrics.filter(|m| loopback_only(m)) {
        problems.push(format!(
            "{at}: --metrics {metrics} is on loopback, out of a scraper's reach (the node's \
             loopback on the host network): give it the node's IPs, $(HOST_IPS):PORT"
        ));
    }
    if scrape == Some("true") {
        if metrics.is_none() {
            problems.push(format!(
                "{at}: prometheus.io/scrape is \"true\" but the agent has no --metrics listener \
                 (the admin server is on the node's loopback, out of the scraper's reach)"
            ));
        }
        if port.is_none() {
            problems.push(format!(
                "{at}: prometheus.io/scrape without prometheus.io/port: the pod declares no ports, \
                 the scraper would not know where --metrics listens"
            ));
        }
    }
    if let Some(port) = port {
        let listening = metrics.and_then(port_of);
        if port.parse::<u16>().ok() != listening || listening.is_none() {
            let metrics = metrics.unwrap_or("not given");
            problems.push(format!(
                "{at}: prometheus.io/port is {port}, --metrics is {metrics}"
            ));
        }
    }
    if let Some(path) = path.filter(|p| *p != "/metrics") {
        problems.push(format!(
            "{at}: prometheus.io/path is {path}; --metrics serves /metrics only"
        ));
    }
    problems
}

fn container_ports(container: &Node<'_>) -> Result<BTreeMap<String, u16>, String> {
    let mut ports = BTreeMap::new();
    for port in container.list("ports")? {
        if let Some(name) = port.opt_str("name")? {
            let number = port.req("containerPort")?;
            let value = u16::try_from(number.int()?).map_err(|_| number.err("not a port"))?;
            ports.insert(name.to_owned(), value);
        }
    }
    Ok(ports)
}

/// An exec readiness probe of `--ready-file`: the agent run with `--probe-ready-file` naming the
/// same file, in a folder of the pod's own (a volume, not a host path the next pod shares).
fn check_ready_file_probe(
    agent: &Agent<'_>,
    probe: &Node<'_>,
    agent_flags: Option<&AgentFlags>,
) -> Result<(), String> {
    let command = probe.req("exec")?.req("command")?;
    let words: Vec<&str> = command
        .value
        .as_sequence()
        .ok_or_else(|| command.err("expected a list"))?
        .iter()
        .filter_map(|w| w.as_str())
        .collect();
    let probed = words
        .iter()
        .enumerate()
        .find_map(|(i, w)| match w.split_once('=') {
            Some(("--probe-ready-file", file)) => Some(file.to_owned()),
            _ if *w == "--probe-ready-file" => words.get(i + 1).map(|f| (*f).to_owned()),
            _ => None,
        });
    let Some(probed) = probed else {
        return Err(command.err("expected the agent with --probe-ready-file=F"));
    };
    let Some(ready_file) = agent.flag_value("ready-file", agent_flags) else {
        return Err(command.err(format!(
            "probes {probed}, but the args have no --ready-file: the agent never writes it"
        )));
    };
    if probed != ready_file {
        return Err(command.err(format!(
            "probes {probed}, but the agent writes --ready-file {ready_file}"
        )));
    }
    let dir = Path::new(&ready_file)
        .parent()
        .and_then(Path::to_str)
        .unwrap_or("/")
        .trim_end_matches('/');
    // The pod's own and writable: a hostPath is shared with the next pod on the node, and a
    // configMap, secret or projected volume is mounted read-only whatever the mount says (the
    // agent, which removes a stale file at start, could not start).
    match mount_at(agent, dir, "emptyDir")? {
        None => Err(format!(
            "{}: no volumeMount at {dir}, the folder of --ready-file: the root filesystem is \
             read-only (mount an emptyDir there)",
            agent.container.path
        )),
        Some((mount, None)) => Err(mount.err(
            "not an emptyDir: the ready file must be the pod's own and writable (a hostPath is \
             shared with the next pod on the node; a configMap, secret or projected volume is \
             read-only)",
        )),
        Some((mount, Some(_))) if mount.opt_bool("readOnly")? == Some(true) => {
            Err(mount.err("readOnly: the agent writes its ready file there"))
        }
        Some(_) => Ok(()),
    }
}

fn check_probe(
    container: &Node<'_>,
    probe: &str,
    path: &str,
    required: bool,
    admin: SocketAddr,
    named_ports: &BTreeMap<String, u16>,
) -> Result<(), String> {
    let Some(node) = container.get(probe)? else {
        return if required {
            Err(container.child(probe, &Value::Null).err("missing"))
        } else {
            Ok(())
        };
    };
    let get = node
        .get("httpGet")?
        .ok_or_else(|| node.err("expected an httpGet probe of the admin server"))?;
    let actual = get.req("path")?;
    if actual.str()? != path {
        return Err(actual.err(format!("`{}`, expected {path}", actual.str()?)));
    }
    let port_node = get.req("port")?;
    let port = match port_node.value.as_str() {
        Some(name) => *named_ports
            .get(name)
            .ok_or_else(|| port_node.err(format!("no container port named {name}")))?,
        None => u16::try_from(port_node.int()?).map_err(|_| port_node.err("not a port"))?,
    };
    if port != admin.port() {
        return Err(port_node.err(format!(
            "{port}, but --admin listens on port {}",
            admin.port()
        )));
    }
    if !admin.ip().is_unspecified() {
        let host = get.opt_str("host")?;
        if host.and_then(|h| h.parse().ok()) != Some(admin.ip()) {
            return Err(get.err(format!(
                "host {}: the admin server listens on {} only (set httpGet.host to it)",
                host.unwrap_or("(unset: the pod IP)"),
                admin.ip()
            )));
        }
    }
    if let Some(scheme) = get.opt_str("scheme")? {
        if scheme != "HTTP" {
            return Err(get.err(format!("scheme {scheme}: the admin server speaks HTTP")));
        }
    }
    Ok(())
}

// (d) ---------------------------------------------------------------------------------------

/// The agent's rendered image against the `images:` rules of the kustomization and its bases:
/// the outermost rule giving an image the agent's name must account for its tag and digest, and
/// each of the kustomization's own rules must show in some rendered image (a rule whose `name`
/// matches no image changes nothing, silently).
fn check_image(
    dir: &Path,
    root: &Path,
    docs: &[Doc],
    agent: &Agent<'_>,
    agent_version: &Result<String, String>,
) -> Outcome {
    let container = &agent.container;
    let image = container
        .req("image")
        .and_then(|i| i.str())
        .map_err(|e| vec![e])?;
    let kustomization = Kustomization::read(dir, root).map_err(|e| vec![e])?;
    let rules = kustomization
        .image_rules_with_bases(root)
        .map_err(|e| vec![e])?;
    let mut rendered_images = Vec::new();
    for doc in docs {
        container_images(&doc.value, &mut rendered_images);
    }
    let mut problems: Vec<String> = kustomization
        .images
        .iter()
        .filter(|rule| !rendered_images.iter().any(|i| rule.produces(i)))
        .map(|rule| {
            format!(
                "{}: no rendered image is `{}`: no container image is named `{}`, so this rule \
                 changes nothing",
                rule.source,
                rule.new_image(),
                rule.name
            )
        })
        .collect();
    let key = format!("{}, {}", agent.daemonset.source, container.path);
    let (name, tag, digest) = split_image(image);
    let Some(rule) = rules.iter().find(|rule| rule.new_image_name() == name) else {
        problems.push(format!(
            "{key}: image `{image}` is set by no `images:` entry of {} or its bases",
            display(dir, root)
        ));
        return Err(problems);
    };
    if !rule.produces(image) {
        problems.push(format!(
            "{}: sets `{}`, but the agent's image renders as `{image}`",
            rule.source,
            rule.new_image()
        ));
    }
    match (tag, digest) {
        (_, Some(_)) => {}
        (None, None) => problems.push(format!("{key}: image `{image}` has no tag")),
        (Some("latest"), None) => problems.push(format!(
            "{key}: image `{image}`: name a version, not latest"
        )),
        (Some(_), None) => {}
    }
    if dir.ends_with("deploy/base") {
        match agent_version {
            Ok(version) if tag != Some(version.as_str()) => problems.push(format!(
                "{}: the base's image tag is {}, proxy-agent's version is {version}",
                rule.source,
                tag.unwrap_or("(none)")
            )),
            Ok(_) => {}
            Err(e) => problems.push(e.clone()),
        }
    }
    let script = dir.join("demo.sh");
    if let Ok(text) = std::fs::read_to_string(&script) {
        let built = text
            .lines()
            .find_map(|l| l.strip_prefix("AGENT_IMAGE="))
            .map(|v| v.split_whitespace().next().unwrap_or(""));
        match built {
            Some(built) if built == image => {}
            Some(built) => problems.push(format!(
                "{} builds and loads {built}, the DaemonSet runs {image}",
                display(&script, root)
            )),
            None => problems.push(format!(
                "{}: no AGENT_IMAGE= line to compare with",
                display(&script, root)
            )),
        }
    }
    outcome(problems, || format!("{image}, set by {}", rule.source))
}

// (e) ---------------------------------------------------------------------------------------

/// What an agent's shutdown takes beside its drain, rounded up: up to 1.5 s taking the
/// connections its listeners still hold (`proxy/tcp.rs` DEFERRAL), 3 s releasing the status lease
/// (`proxy-agent/src/status/mod.rs`) and 2 s writing out its last log lines (`main.rs`).
const SHUTDOWN_BESIDE_DRAIN_SECONDS: i64 = 7;

fn check_grace(agent: &Agent<'_>, agent_flags: Option<&AgentFlags>) -> Outcome {
    let Some(drain) = agent.flag_value("drain-timeout-s", agent_flags) else {
        return Err(vec![
            "no --drain-timeout-s in the args and no `proxy-agent --print-flags` for its default"
                .into(),
        ]);
    };
    let drain: i64 = drain
        .parse()
        .map_err(|_| vec![format!("--drain-timeout-s `{drain}` is not a number")])?;
    let grace = match agent.pod_spec.get("terminationGracePeriodSeconds") {
        Ok(Some(node)) => node.int().map_err(|e| vec![e])?,
        Ok(None) => DEFAULT_GRACE_SECONDS,
        Err(e) => return Err(vec![e]),
    };
    let needed = drain + SHUTDOWN_BESIDE_DRAIN_SECONDS;
    if grace >= needed {
        Ok(format!(
            "terminationGracePeriodSeconds {grace} >= --drain-timeout-s {drain} + \
             {SHUTDOWN_BESIDE_DRAIN_SECONDS}"
        ))
    } else {
        Err(vec![format!(
            "{}: terminationGracePeriodSeconds is {grace}, less than --drain-timeout-s {drain} \
             + {SHUTDOWN_BESIDE_DRAIN_SECONDS} s: the kubelet would SIGKILL a draining agent",
            agent.pod_spec.err("").trim_end_matches(": ")
        )])
    }
}

// (f) ---------------------------------------------------------------------------------------

fn capability(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_owned()
}

fn check_security(agent: &Agent<'_>, agent_flags: Option<&AgentFlags>) -> Outcome {
    let takeover_dir = takeover_dir(agent, agent_flags);
    let mut problems = Vec::new();
    let result = (|| -> Result<(), String> {
        let spec = &agent.pod_spec;
        for field in ["hostPID", "hostIPC"] {
            if spec.opt_bool(field)? == Some(true) {
                problems.push(spec.err(format!("{field}: true, which the agent does not need")));
            }
        }
        let sc = agent.container.req("securityContext")?;
        if sc.opt_bool("privileged")? == Some(true) {
            problems.push(sc.err("privileged: true; add the documented capabilities instead"));
        }
        if sc.opt_bool("readOnlyRootFilesystem")? != Some(true) {
            problems.push(sc.err("readOnlyRootFilesystem must be true"));
        }
        // The container's, else the pod's (which the container's overrides).
        let pod_sc = spec.get("securityContext")?;
        let uid = match sc.get("runAsUser")? {
            Some(uid) => Some(uid.int()?),
            None => match pod_sc
                .as_ref()
                .map(|p| p.get("runAsUser"))
                .transpose()?
                .flatten()
            {
                Some(uid) => Some(uid.int()?),
                None => None,
            },
        };
        if uid != Some(0) {
            problems.push(sc.err(
                "runAsUser must be 0: Kubernetes gives a non-root user none of the added \
                 capabilities (the image's own user is not root)",
            ));
        }
        let caps = sc.req("capabilities")?;
        let drop: Vec<String> = caps
            .str_list("drop")?
            .iter()
            .map(|c| capability(c))
            .collect();
        if !drop.iter().any(|c| c == "ALL") {
            problems.push(caps.err("drop must contain ALL"));
        }
        let add: BTreeSet<String> = caps
            .str_list("add")?
            .iter()
            .map(|c| capability(c))
            .collect();
        for cap in &add {
            if !DOCUMENTED_CAPABILITIES.iter().any(|(c, _)| c == cap) {
                problems.push(caps.err(format!(
                    "adds {cap}, which is not documented (DOCUMENTED_CAPABILITIES in \
                     xtask/src/check_deploy.rs and the DaemonSet's comments)"
                )));
            }
        }
        for (cap, why) in DOCUMENTED_CAPABILITIES {
            if !add.contains(*cap) {
                problems
                    .push(caps.err(format!("does not add {cap}, which the agent needs: {why}")));
            }
        }
        let host_volumes: BTreeSet<&str> = spec
            .list("volumes")?
            .iter()
            .filter(|v| v.get("hostPath").ok().flatten().is_some())
            .filter_map(|v| v.opt_str("name").ok().flatten())
            .collect();
        for mount in agent.container.list("volumeMounts")? {
            let name = mount.req("name")?.str()?;
            let path = mount.req("mountPath")?.str()?.trim_end_matches('/');
            let writable_allowed = takeover_dir.as_deref() == Some(path);
            if host_volumes.contains(name)
                && !writable_allowed
                && mount.opt_bool("readOnly")? != Some(true)
            {
                problems.push(mount.err(format!(
                    "host path volume {name} must be mounted readOnly (only the takeover \
                     socket's folder may be writable)"
                )));
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        problems.push(e);
    }
    outcome(problems, || {
        let caps: Vec<&str> = DOCUMENTED_CAPABILITIES.iter().map(|(c, _)| *c).collect();
        format!(
            "not privileged, read-only root filesystem, drop ALL, add {} only, host paths read-only{}",
            caps.join(" + "),
            takeover_dir
                .as_deref()
                .map(|d| format!(" but the takeover socket's {d}"))
                .unwrap_or_default()
        )
    })
}

// (g) ---------------------------------------------------------------------------------------

/// The agent container's volumeMount at `path` (trailing slashes aside), with its volume's
/// `source` (`hostPath`, `emptyDir`) if the volume is of that kind.
fn mount_at<'a>(
    agent: &Agent<'a>,
    path: &str,
    source: &str,
) -> Result<Option<(Node<'a>, Option<Node<'a>>)>, String> {
    for mount in agent.container.list("volumeMounts")? {
        if mount.req("mountPath")?.str()?.trim_end_matches('/') != path {
            continue;
        }
        let name = mount.req("name")?.str()?;
        let mut of_kind = None;
        for volume in agent.pod_spec.list("volumes")? {
            if volume.opt_str("name")? == Some(name) {
                of_kind = volume.get(source)?;
                break;
            }
        }
        return Ok(Some((mount, of_kind)));
    }
    Ok(None)
}

fn check_cgroup(agent: &Agent<'_>, agent_flags: Option<&AgentFlags>) -> Outcome {
    let Some(cgroup) = agent.flag_value("cgroup", agent_flags) else {
        return Err(vec![format!(
            "{}: no --cgroup in the args: the redirect needs the pods' cgroup",
            agent.container.path
        )]);
    };
    let mut problems = Vec::new();
    if cgroup.contains("$(") || cgroup.contains('<') {
        problems.push(format!(
            "--cgroup `{cgroup}` does not resolve to a path in the manifests"
        ));
    } else if !(cgroup == CGROUP_ROOT || cgroup.starts_with(&format!("{CGROUP_ROOT}/")))
        || cgroup.split('/').any(|c| c == "..")
    {
        problems.push(format!(
            "--cgroup `{cgroup}` is not under {CGROUP_ROOT}, where the agent sees the host's \
             cgroup hierarchy"
        ));
    }
    let result = (|| -> Result<bool, String> {
        let Some((_, Some(host))) = mount_at(agent, CGROUP_ROOT, "hostPath")? else {
            return Ok(false);
        };
        let path = host.req("path")?.str()?;
        if path.trim_end_matches('/') == CGROUP_ROOT {
            return Ok(true);
        }
        Err(host.err(format!("{path}, expected {CGROUP_ROOT}")))
    })();
    match result {
        Ok(true) => {}
        Ok(false) => problems.push(format!(
            "{}: no volumeMount of the host's {CGROUP_ROOT} (a hostPath volume) at {CGROUP_ROOT}",
            agent.container.path
        )),
        Err(e) => problems.push(e),
    }
    outcome(problems, || {
        format!("--cgroup {cgroup}, under the host's {CGROUP_ROOT} mounted at the same path")
    })
}

// (h) ---------------------------------------------------------------------------------------

/// The folder of `--takeover-socket`, if given.
fn takeover_dir(agent: &Agent<'_>, agent_flags: Option<&AgentFlags>) -> Option<String> {
    let socket = agent.flag_value("takeover-socket", agent_flags)?;
    let dir = Path::new(&socket).parent()?.to_str()?.trim_end_matches('/');
    Some(dir.to_owned())
}

/// maxSurge / maxUnavailable as written: a count, or a percentage (non-zero when above 0%).
fn is_zero(node: Option<Node<'_>>) -> Result<bool, String> {
    let Some(node) = node else {
        return Ok(false);
    };
    match node.value.as_str() {
        Some(text) => Ok(text.trim_end_matches('%').trim() == "0"),
        None => Ok(node.int()? == 0),
    }
}

fn check_takeover(agent: &Agent<'_>, agent_flags: Option<&AgentFlags>) -> Outcome {
    let mut problems = Vec::new();
    let dir = takeover_dir(agent, agent_flags);
    let result = (|| -> Result<(), String> {
        let strategy = agent.daemonset.root().req("spec")?.get("updateStrategy")?;
        let rolling = match &strategy {
            Some(s) => s.get("rollingUpdate")?,
            None => None,
        };
        // Kubernetes' defaults: maxSurge 0, maxUnavailable 1.
        let (surge, unavailable) = match &rolling {
            Some(r) => (r.get("maxSurge")?, r.get("maxUnavailable")?),
            None => (None, None),
        };
        let surge_zero = surge.is_none() || is_zero(surge)?;
        let at = rolling.as_ref().or(strategy.as_ref()).map_or_else(
            || format!("{}: spec.updateStrategy", agent.daemonset.source),
            |n| n.path.clone(),
        );
        let Some(dir) = &dir else {
            if !surge_zero {
                problems.push(format!(
                    "{at}: maxSurge above 0 without --takeover-socket: the new agent could not \
                     bind the node's ports while the old one runs"
                ));
            }
            return Ok(());
        };
        if surge_zero {
            problems.push(format!(
                "{at}: --takeover-socket without maxSurge ≥ 1: the old pod is deleted before the \
                 new one starts, so there is nothing to take over"
            ));
        }
        // Unset: Kubernetes' default of 1.
        if !is_zero(unavailable)? {
            problems.push(format!(
                "{at}: maxUnavailable must be 0 with --takeover-socket, so that the old pod runs \
                 until the new one has taken over"
            ));
        }
        if !agent.container.list("ports")?.is_empty() {
            problems.push(agent.container.child("ports", &Value::Null).err(
                "declared ports on the host network are host ports: the surge pod could not be \
                 scheduled beside the old one; declare none",
            ));
        }
        // During a surge two agents share the node: the status lease tells them apart by their
        // pod's name. Without it each is `<hostname>/<pid>`, on the host network and as pid 1
        // the same for both, and both would take the lease for theirs.
        match agent.env.get("POD_NAME") {
            Some(EnvSource::Field(field)) if field == "metadata.name" => {}
            _ => problems.push(format!(
                "{}: POD_NAME must come from the downward API (fieldRef metadata.name): the two \
                 agents of a node during an update are told apart by it in the status lease",
                agent.container.path
            )),
        }
        match agent.flag_value("after-takeover", agent_flags).as_deref() {
            Some("wait") => {}
            other => problems.push(format!(
                "{}: --after-takeover is {}, expected wait: an old container that exits is \
                 restarted by the kubelet and takes over back from the new one",
                agent.container.path,
                other.unwrap_or("not set")
            )),
        }
        let Some((mount, host)) = mount_at(agent, dir, "hostPath")? else {
            problems.push(format!(
                "{}: no volumeMount at {dir}, the folder of --takeover-socket: the new pod would \
                 not see the old one's socket",
                agent.container.path
            ));
            return Ok(());
        };
        if mount.opt_bool("readOnly")? == Some(true) {
            problems.push(mount.err("readOnly: the agent creates its takeover socket there"));
        }
        let name = mount.req("name")?.str()?;
        match host {
            None => problems.push(mount.err(format!(
                "volume {name} is not a hostPath: another pod would not see the socket"
            ))),
            Some(host) => {
                let kind = host.opt_str("type")?.unwrap_or("");
                if kind != "DirectoryOrCreate" {
                    problems.push(host.err(format!(
                        "type `{kind}`, expected DirectoryOrCreate (a folder for the socket; \
                         under /run, a tmpfs, it is gone after a reboot)"
                    )));
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        problems.push(e);
    }
    outcome(problems, || match &dir {
        Some(dir) => format!(
            "--takeover-socket in the host path {dir}, maxSurge ≥ 1 and maxUnavailable 0, no \
             host ports, --after-takeover=wait, POD_NAME from the downward API"
        ),
        None => "no takeover: no surge".to_string(),
    })
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// Rendered objects written inline, named as kustomize's output is.
    fn docs(yaml: &str) -> Vec<Doc> {
        parse_rendered(yaml, "fixture").unwrap()
    }

    /// A folder of files under the system's temp folder, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        /// `test` keeps the folders of tests running at the same time apart.
        fn with_files(test: &str, files: &[(&str, &str)]) -> Self {
            let dir =
                std::env::temp_dir().join(format!("check-deploy-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            for (path, text) in files {
                let path = dir.join(path);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, text).unwrap();
            }
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn calls(json: &str) -> Vec<ApiCall> {
        parse_rbac_json(json).unwrap()
    }

    const AGENT_CALLS: &str = r#"[
        {"apiGroup": "", "resource": "services", "verbs": ["list", "watch"]},
        {"apiGroup": "gateway.networking.k8s.io", "resource": "httproutes/status", "verbs": ["patch"]},
        {"apiGroup": "coordination.k8s.io", "resource": "leases", "verbs": ["get", "create", "update"]}
    ]"#;

    const BINDINGS: &str = "
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: agent}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: agent}
subjects: [{kind: ServiceAccount, name: agent, namespace: gamma-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: leader, namespace: gamma-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: leader}
subjects: [{kind: ServiceAccount, name: agent, namespace: gamma-system}]
";

    const LEASE_ROLE: &str = "
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: leader, namespace: gamma-system}
rules:
- {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get, create, update]}
";

    const LEASE: &str = "gamma-node-status";

    /// The Role `leader` in gamma-system with `rules` (YAML list lines).
    fn lease_role(rules: &str) -> String {
        format!(
            "\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: leader, namespace: gamma-system}}\nrules:\n{rules}\n"
        )
    }

    fn starting_with<'p>(problems: &'p [String], kind: &str) -> Vec<&'p String> {
        problems.iter().filter(|p| p.starts_with(kind)).collect()
    }

    fn rbac_problems(cluster_rules: &str, role: &str, json: &str) -> Vec<String> {
        let yaml = format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: \
             agent}}\nrules:\n{cluster_rules}\n---{BINDINGS}---{role}"
        );
        let docs = docs(&yaml);
        let mut problems = Vec::new();
        let grants = grants_of(&docs, "gamma-system", "agent", LEASE, &mut problems);
        problems.extend(compare_rbac(&grants, &calls(json), "gamma-system"));
        problems.sort();
        problems
    }

    #[test]
    fn rbac_that_matches_the_calls_has_no_problem() {
        let rules = "
- {apiGroups: [''], resources: [services], verbs: [list, watch]}
- {apiGroups: [gateway.networking.k8s.io], resources: [httproutes/status], verbs: [patch]}";
        assert_eq!(
            rbac_problems(rules, LEASE_ROLE, AGENT_CALLS),
            Vec::<String>::new()
        );
    }

    /// A rule limited to named objects: get and update of the lease by its name count; its
    /// create (never matched by a name), and a named status patch (the agent patches every
    /// route), do not, and are told apart from a grant that is merely missing.
    #[test]
    fn rbac_rules_with_resource_names_grant_only_the_lease_by_its_name() {
        let named = |lease: &str| {
            lease_role(&format!(
                "- {{apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get, update], resourceNames: [{lease}]}}
- {{apiGroups: [coordination.k8s.io], resources: [leases], verbs: [create]}}"
            ))
        };
        let rules = "
- {apiGroups: [''], resources: [services], verbs: [list, watch]}
- {apiGroups: [gateway.networking.k8s.io], resources: [httproutes/status], verbs: [patch]}";
        assert_eq!(
            rbac_problems(rules, &named(LEASE), AGENT_CALLS),
            Vec::<String>::new()
        );
        let every = lease_role(
            "- {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get, create, update], resourceNames: []}",
        );
        assert_eq!(
            rbac_problems(rules, &every, AGENT_CALLS),
            Vec::<String>::new(),
            "an empty list names every object"
        );
        let problems = rbac_problems(rules, &named("another"), AGENT_CALLS);
        assert!(
            problems.contains(&"missing: get coordination.k8s.io/leases in namespace gamma-system (add it to a Role in gamma-system)".to_string()),
            "{problems:#?}"
        );

        let role = lease_role(
            "- {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get, create, update], resourceNames: [gamma-node-status]}",
        );
        let rules = "
- {apiGroups: [''], resources: [services], verbs: [list, watch]}
- {apiGroups: [gateway.networking.k8s.io], resources: [httproutes/status], verbs: [patch], resourceNames: [one]}";
        let problems = rbac_problems(rules, &role, AGENT_CALLS);
        let missing = starting_with(&problems, "missing");
        assert_eq!(
            missing,
            [
                "missing: create coordination.k8s.io/leases in namespace gamma-system (add it to a Role in gamma-system)",
                "missing: patch gateway.networking.k8s.io/httproutes/status cluster-wide (add it to the ClusterRole)",
            ]
        );
        assert_eq!(
            starting_with(&problems, "ineffective").len(),
            2,
            "{problems:#?}"
        );
    }

    #[test]
    fn rbac_names_missing_grants() {
        // No watch on services, no status patch, and no lease Role at all.
        let rules = "- {apiGroups: [''], resources: [services], verbs: [list]}";
        let role = "\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: unrelated}\n";
        let problems = rbac_problems(rules, role, AGENT_CALLS);
        let missing = starting_with(&problems, "missing");
        assert_eq!(
            missing,
            [
                "missing: create coordination.k8s.io/leases in namespace gamma-system (add it to a Role in gamma-system)",
                "missing: get coordination.k8s.io/leases in namespace gamma-system (add it to a Role in gamma-system)",
                "missing: patch gateway.networking.k8s.io/httproutes/status cluster-wide (add it to the ClusterRole)",
                "missing: update coordination.k8s.io/leases in namespace gamma-system (add it to a Role in gamma-system)",
                "missing: watch core/services cluster-wide (add it to the ClusterRole)",
            ]
        );
        // The RoleBinding points at a Role that does not exist.
        assert!(
            problems
                .iter()
                .any(|p| p.contains("Role leader is not in the rendered manifests")),
            "{problems:#?}"
        );
    }

    #[test]
    fn rbac_names_excess_grants() {
        let rules = "
- {apiGroups: [''], resources: [services, pods], verbs: [list, watch, delete]}
- {apiGroups: [gateway.networking.k8s.io], resources: [httproutes/status], verbs: [patch]}
- {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get]}
- {apiGroups: ['*'], resources: [secrets], verbs: [get]}";
        let problems = rbac_problems(rules, LEASE_ROLE, AGENT_CALLS);
        let expected = [
            "excess: ClusterRole agent, rules[0] grants delete core/pods cluster-wide, which the agent never calls",
            "excess: ClusterRole agent, rules[0] grants delete core/services cluster-wide, which the agent never calls",
            "excess: ClusterRole agent, rules[0] grants list core/pods cluster-wide, which the agent never calls",
            "excess: ClusterRole agent, rules[0] grants watch core/pods cluster-wide, which the agent never calls",
            "excess: ClusterRole agent, rules[2] grants get coordination.k8s.io/leases cluster-wide; the agent needs it only in namespace gamma-system (use a Role)",
            "excess: ClusterRole agent, rules[3] grants get */secrets cluster-wide, which the agent never calls",
            "excess: ClusterRole agent, rules[3] uses the wildcard `*`",
        ];
        assert_eq!(problems, expected);
    }

    #[test]
    fn rbac_flags_foreign_subjects_and_unbound_roles() {
        let yaml = format!(
            "{LEASE_ROLE}---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: spare}}
rules: []
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: leader, namespace: gamma-system}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: leader}}
subjects:
- {{kind: ServiceAccount, name: agent, namespace: gamma-system}}
- {{kind: ServiceAccount, name: default, namespace: default}}
"
        );
        let mut problems = Vec::new();
        let grants = grants_of(&docs(&yaml), "gamma-system", "agent", LEASE, &mut problems);
        assert_eq!(grants.len(), 3);
        assert_eq!(
            problems,
            [
                "RoleBinding gamma-system/leader, subjects[1]: excess: binds ServiceAccount default/default, not the agent's ServiceAccount gamma-system/agent",
                "excess: ClusterRole spare is not bound to the agent's ServiceAccount gamma-system/agent",
            ]
        );
    }

    #[test]
    fn parse_errors_name_file_document_and_field() {
        let dir = TempDir::with_files(
            "parse",
            &[
                (
                    "sub/a.yaml",
                    "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\nkind: [oops\n",
                ),
                (
                    "b.yml",
                    "apiVersion: v1\nkind: Service\nmetadata: {namespace: x}\n---\napiVersion: 1\nkind: Pod\nmetadata: {name: p}\n",
                ),
            ],
        );
        let problems = parse_all(&dir.0, &dir.0).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert_eq!(problems[0], "b.yml, document 1, metadata.name: missing");
        assert_eq!(
            problems[1],
            "b.yml, document 2, apiVersion: expected a string"
        );
        assert!(
            problems[2].starts_with("sub/a.yaml, document 2: "),
            "{problems:#?}"
        );
    }

    /// A few of the agent's flags, as `proxy-agent --print-flags` prints them.
    const FLAGS_JSON: &str = r#"[
        {"name": "kube", "takesValue": false, "default": null},
        {"name": "manifests", "takesValue": true, "default": null},
        {"name": "admin", "takesValue": true, "default": "127.0.0.1:15000"},
        {"name": "drain-timeout-s", "takesValue": true, "default": "20"},
        {"name": "takeover-socket", "takesValue": true, "default": null},
        {"name": "after-takeover", "takesValue": true, "default": "exit"}
    ]"#;

    fn agent_flags() -> AgentFlags {
        parse_flags_json(FLAGS_JSON).unwrap()
    }

    #[test]
    fn flags_json_gives_flags_values_and_defaults() {
        let flags = agent_flags();
        assert_eq!(
            flags.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "admin",
                "after-takeover",
                "drain-timeout-s",
                "kube",
                "manifests",
                "takeover-socket"
            ]
        );
        assert_eq!(
            flags["kube"],
            FlagInfo {
                takes_value: false,
                default: None
            }
        );
        assert!(flags["manifests"].takes_value);
        assert_eq!(flags["admin"].default.as_deref(), Some("127.0.0.1:15000"));
        assert_eq!(flags["drain-timeout-s"].default.as_deref(), Some("20"));
        assert_eq!(flags["manifests"].default, None);
    }

    #[test]
    fn flags_json_that_is_malformed_or_ambiguous_is_refused() {
        let error = parse_flags_json("Usage: proxy-agent [OPTIONS]").unwrap_err();
        assert!(
            error.starts_with("the --print-flags JSON does not parse"),
            "{error}"
        );
        let error = parse_flags_json(r#"[{"name": "kube", "default": null}]"#).unwrap_err();
        assert!(error.contains("takesValue"), "{error}");
        let twice = r#"[{"name": "kube", "takesValue": false, "default": null},
                        {"name": "kube", "takesValue": true, "default": null}]"#;
        assert_eq!(
            parse_flags_json(twice).unwrap_err(),
            "the --print-flags JSON lists --kube twice"
        );
    }

    fn daemonset(container: &str, pod: &str) -> Vec<Doc> {
        let yaml = format!(
            "
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: agent, namespace: gamma-system}}
spec:
  template:
    spec:
{pod}
      containers:
      - name: proxy-agent
{container}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: config, namespace: gamma-system}}
data: {{CGROUP_DIR: /sys/fs/cgroup/kubepods.slice}}
"
        );
        docs(&yaml)
    }

    /// root is asked of the container, or of the pod when the container says nothing.
    #[test]
    fn run_as_root_may_be_the_pods() {
        let container = "        args: []
        securityContext: {readOnlyRootFilesystem: true, capabilities: {drop: [ALL], add: [NET_ADMIN, SYS_ADMIN]}}";
        let runs_as = |pod: &str| {
            let rendered = daemonset(container, pod);
            let agent = Agent::find(&rendered).unwrap();
            check_security(&agent, Some(&agent_flags()))
                .err()
                .unwrap_or_default()
                .iter()
                .any(|p| p.contains("runAsUser must be 0"))
        };
        assert!(
            !runs_as("      securityContext: {runAsUser: 0}"),
            "the pod's"
        );
        assert!(runs_as("      securityContext: {runAsUser: 65532}"));
        assert!(runs_as(""), "unset: the image's user");
    }

    /// Prometheus's annotations must lead to `--metrics`, which serves /metrics only.
    #[test]
    fn scrape_annotations_lead_to_the_metrics_listener() {
        let problems = |annotations: &str, args: &str| {
            let rendered = docs(&format!(
                "
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: agent, namespace: gamma-system}}
spec:
  template:
    metadata: {{annotations: {{{annotations}}}}}
    spec:
      containers: [{{name: proxy-agent, args: [{args}]}}]
"
            ));
            let agent = Agent::find(&rendered).unwrap();
            let metrics = agent.flag_value("metrics", Some(&agent_flags()));
            check_scrape_annotations(&agent, metrics.as_deref())
        };
        let scraped = "prometheus.io/scrape: 'true', prometheus.io/port: '15090'";
        assert_eq!(
            problems(scraped, "'--metrics=$(HOST_IPS):15090'"),
            Vec::<String>::new()
        );
        assert_eq!(
            problems("", ""),
            Vec::<String>::new(),
            "no annotations, no listener"
        );
        let missing = problems(scraped, "");
        assert_eq!(missing.len(), 2, "{missing:#?}");
        assert!(missing[0].contains("no --metrics listener"), "{missing:#?}");
        assert!(missing[1].contains("prometheus.io/port is 15090, --metrics is not given"));
        let other = problems(scraped, "'--metrics=10.0.0.1:9090'");
        assert_eq!(other.len(), 1, "{other:#?}");
        assert!(
            other[0].contains("--metrics is 10.0.0.1:9090"),
            "{other:#?}"
        );
        let portless = problems("prometheus.io/scrape: 'true'", "'--metrics=10.0.0.1:9090'");
        assert!(
            portless[0].contains("without prometheus.io/port"),
            "{portless:#?}"
        );
        let path = problems(
            &format!("{scraped}, prometheus.io/path: /stats"),
            "'--metrics=10.0.0.1:15090'",
        );
        assert!(path[0].contains("serves /metrics only"), "{path:#?}");
        let loopback = problems(scraped, "'--metrics=127.0.0.1:15090'");
        assert_eq!(loopback.len(), 1, "{loopback:#?}");
        assert!(loopback[0].contains("on loopback"), "{loopback:#?}");
        let unquoted = problems(
            "prometheus.io/scrape: true, prometheus.io/port: 15090",
            "'--metrics=$(HOST_IPS):15090'",
        );
        assert_eq!(unquoted.len(), 2, "{unquoted:#?}");
        assert!(
            unquoted.iter().all(|p| p.contains("quote it")),
            "{unquoted:#?}"
        );
    }

    #[test]
    fn flags_are_checked_against_print_flags() {
        let rendered = daemonset(
            "        args: [--kube=yes, --manifests, --admin, '--nope=1', '--admin=$(HOST_IP):1', stray]
        env:
        - {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
        - {name: CGROUP_DIR, valueFrom: {configMapKeyRef: {name: config, key: MISSING}}}",
            "",
        );
        let agent = Agent::find(&rendered).unwrap();
        let problems = check_flags(&agent, &agent_flags()).unwrap_err();
        let at = "DaemonSet gamma-system/agent, spec.template.spec.containers[0]";
        assert_eq!(
            problems,
            [
                format!("{at}.env[1].valueFrom.configMapKeyRef: no key MISSING in a ConfigMap gamma-system/config of the rendered manifests"),
                format!("{at}.args[0]: --kube takes no value"),
                format!("{at}.args[1]: --manifests takes a value; none follows"),
                format!("{at}.args[2]: --admin takes a value; none follows"),
                format!("{at}.args[3]: proxy-agent --print-flags lists no --nope"),
                format!("{at}.args[4]: $(HOST_IP) is not an env var of the container: Kubernetes would pass it literally"),
                format!("{at}.args[5]: `stray` is neither a long flag nor a flag's value"),
            ]
        );
    }

    /// The readiness of a pod's own: the agent probed for the file it writes, in a volume of the
    /// pod's own, writable.
    #[test]
    fn a_ready_file_probe_names_the_file_the_agent_writes_in_a_volume_of_its_own() {
        let check = |args: &str, probed: &str, volume: &str| {
            let rendered = daemonset(
                &format!(
                    "        args: [{args}]
        readinessProbe: {{exec: {{command: [/usr/local/bin/proxy-agent, '--probe-ready-file={probed}']}}}}
        volumeMounts: [{{name: state, mountPath: /run/pod}}]"
                ),
                &format!("      volumes: [{{name: state, {volume}}}]"),
            );
            let agent = Agent::find(&rendered).unwrap();
            let probe = agent.container.get("readinessProbe").unwrap().unwrap();
            check_ready_file_probe(&agent, &probe, Some(&agent_flags()))
        };
        let writes = "'--ready-file=/run/pod/ready'";
        assert_eq!(check(writes, "/run/pod/ready", "emptyDir: {}"), Ok(()));
        for (args, probed, volume, says) in [
            (
                writes,
                "/run/pod/other",
                "emptyDir: {}",
                "but the agent writes",
            ),
            (
                "--kube",
                "/run/pod/ready",
                "emptyDir: {}",
                "no --ready-file",
            ),
            (
                writes,
                "/run/pod/ready",
                "hostPath: {path: /run/x}",
                "a hostPath",
            ),
            (
                writes,
                "/run/pod/ready",
                "configMap: {name: c}",
                "not an emptyDir",
            ),
            (
                "'--ready-file=/tmp/ready'",
                "/tmp/ready",
                "emptyDir: {}",
                "no volumeMount at /tmp",
            ),
        ] {
            let problem = check(args, probed, volume).unwrap_err();
            assert!(problem.contains(says), "{problem}");
        }
    }

    #[test]
    fn probes_grace_security_and_cgroup() {
        let rendered = daemonset(
            "        args: ['--cgroup=$(CGROUP_DIR)', --drain-timeout-s, '40']
        env: [{name: CGROUP_DIR, valueFrom: {configMapKeyRef: {name: config, key: CGROUP_DIR}}}]
        livenessProbe: {httpGet: {host: 127.0.0.1, port: 15000, path: /healthz}}
        readinessProbe: {httpGet: {port: 15000, path: /ready}}
        securityContext:
          privileged: true
          capabilities: {drop: [NET_RAW], add: [CAP_NET_ADMIN, BPF]}
        volumeMounts: [{name: cgroup, mountPath: /sys/fs/cgroup}]",
            "      terminationGracePeriodSeconds: 30
      volumes: [{name: cgroup, hostPath: {path: /sys/fs/cgroup}}]",
        );
        let agent = Agent::find(&rendered).unwrap();
        let flags = agent_flags();
        let at = "DaemonSet gamma-system/agent, spec.template.spec.containers[0]";
        assert_eq!(
            check_probes(&agent, Some(&flags)).unwrap_err(),
            [
                format!("{at}.livenessProbe.httpGet.path: `/healthz`, expected /live"),
                format!("{at}.readinessProbe.httpGet: host (unset: the pod IP): the admin server listens on 127.0.0.1 only (set httpGet.host to it)"),
            ]
        );
        assert!(check_grace(&agent, Some(&flags)).unwrap_err()[0]
            .contains("terminationGracePeriodSeconds is 30, less than --drain-timeout-s 40 + 7 s"));
        let security = check_security(&agent, Some(&flags)).unwrap_err();
        assert_eq!(security.len(), 7, "{security:#?}");
        for expected in [
            "privileged: true",
            "readOnlyRootFilesystem must be true",
            "runAsUser must be 0",
            "drop must contain ALL",
            "adds BPF, which is not documented",
            "does not add SYS_ADMIN",
            "host path volume cgroup must be mounted readOnly",
        ] {
            assert!(
                security.iter().any(|p| p.contains(expected)),
                "{expected}: {security:#?}"
            );
        }
        assert_eq!(
            check_cgroup(&agent, Some(&flags)),
            Ok("--cgroup /sys/fs/cgroup/kubepods.slice, under the host's /sys/fs/cgroup mounted at the same path".into())
        );
    }

    /// A DaemonSet with `strategy` (YAML under spec.updateStrategy.rollingUpdate), the host path
    /// /run/gamma-node of type `folder_type` and the agent container `container`.
    fn takeover_fixture(strategy: &str, folder_type: &str, container: &str) -> Vec<Doc> {
        let yaml = format!(
            "
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: agent, namespace: gamma-system}}
spec:
  updateStrategy: {{type: RollingUpdate, rollingUpdate: {strategy}}}
  template:
    spec:
      volumes:
      - {{name: cgroup, hostPath: {{path: /sys/fs/cgroup}}}}
      - {{name: sockets, hostPath: {{path: /run/gamma-node, type: {folder_type}}}}}
      containers:
      - name: proxy-agent
{container}
"
        );
        docs(&yaml)
    }

    #[test]
    fn takeover_needs_a_surge_a_shared_writable_folder_and_wait() {
        let flags = agent_flags();
        // Everything wrong.
        let rendered = takeover_fixture(
            "{maxSurge: 0}",
            "File",
            "        args: ['--takeover-socket=/run/gamma-node/takeover.sock', --after-takeover=exit]
        ports: [{containerPort: 15001}]
        securityContext: {readOnlyRootFilesystem: true, capabilities: {drop: [ALL], add: [NET_ADMIN, SYS_ADMIN]}}
        volumeMounts:
        - {name: cgroup, mountPath: /sys/fs/cgroup}
        - {name: sockets, mountPath: /run/gamma-node/, readOnly: true}",
        );
        let agent = Agent::find(&rendered).unwrap();
        let problems = check_takeover(&agent, Some(&flags)).unwrap_err();
        for expected in [
            "without maxSurge ≥ 1",
            "maxUnavailable must be 0",
            "declared ports on the host network",
            "--after-takeover is exit, expected wait",
            "readOnly: the agent creates its takeover socket there",
            "type `File`, expected DirectoryOrCreate",
            "POD_NAME must come from the downward API",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{expected}: {problems:#?}"
            );
        }
        assert_eq!(problems.len(), 7, "{problems:#?}");
        // The socket's folder may be writable; another host path may not.
        let security = check_security(&agent, Some(&flags)).unwrap_err();
        assert_eq!(security.len(), 2, "{security:#?}");
        assert!(security[0].contains("runAsUser must be 0"));
        assert!(security[1].contains("host path volume cgroup must be mounted readOnly"));

        // Right.
        let rendered = takeover_fixture(
            "{maxSurge: 1, maxUnavailable: 0}",
            "DirectoryOrCreate",
            "        args: ['--takeover-socket=/run/gamma-node/takeover.sock', --after-takeover=wait]
        env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
        volumeMounts: [{name: sockets, mountPath: /run/gamma-node}]",
        );
        let agent = Agent::find(&rendered).unwrap();
        assert!(
            check_takeover(&agent, Some(&flags)).is_ok(),
            "{:?}",
            check_takeover(&agent, Some(&flags))
        );

        // No takeover: a surge pod could not bind the node's ports.
        let rendered = takeover_fixture(
            "{maxSurge: '10%', maxUnavailable: 0}",
            "DirectoryOrCreate",
            "        args: []",
        );
        let agent = Agent::find(&rendered).unwrap();
        let problems = check_takeover(&agent, Some(&flags)).unwrap_err();
        assert!(
            problems[0].contains("maxSurge above 0 without --takeover-socket"),
            "{problems:?}"
        );
    }

    const AGENT_DAEMONSET: &str = "
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: gamma-system}
spec:
  template:
    spec:
      containers:
      - name: proxy-agent
        image: gamma-node
        env: [{name: CGROUP_DIR, valueFrom: {configMapKeyRef: {name: config, key: CGROUP_DIR}}}]
";

    #[test]
    fn kustomize_renders_objects_named_by_kind_namespace_and_name() {
        let dir = TempDir::with_files(
            "render",
            &[
                ("daemonset.yaml", AGENT_DAEMONSET),
                (
                    "kustomization.yaml",
                    "resources: [daemonset.yaml]
configMapGenerator:
- {name: config, namespace: gamma-system, literals: [CGROUP_DIR=/sys/fs/cgroup/pods]}
",
                ),
            ],
        );
        let docs = render(&dir.0, &dir.0).unwrap();
        let sources: Vec<&str> = docs.iter().map(|d| d.source.as_str()).collect();
        assert_eq!(sources.len(), 2, "{sources:?}");
        // The generated ConfigMap's name carries kustomize's content hash ...
        assert!(
            sources[0].starts_with("ConfigMap gamma-system/config-"),
            "{sources:?}"
        );
        assert_eq!(sources[1], "DaemonSet gamma-system/agent");
        // ... and the reference to it was rewritten to match.
        let agent = Agent::find(&docs).unwrap();
        assert_eq!(
            agent.env["CGROUP_DIR"],
            EnvSource::ConfigMap("/sys/fs/cgroup/pods".into())
        );
    }

    #[test]
    fn kustomize_errors_fail_the_render_with_its_message() {
        let dir = TempDir::with_files(
            "render-error",
            &[("kustomization.yaml", "resources: [missing.yaml]\n")],
        );
        let error = render(&dir.0, &dir.0).unwrap_err();
        assert!(
            error.starts_with(&format!("kubectl kustomize {} failed: ", dir.0.display())),
            "{error}"
        );
        assert!(error.contains("missing.yaml"), "{error}");
    }

    #[test]
    fn image_rules_are_checked_against_the_rendering() {
        let overlay = |images: &str| format!("resources: [../base]\nimages: {images}\n");
        let dir = TempDir::with_files(
            "images",
            &[
                ("deploy/base/daemonset.yaml", AGENT_DAEMONSET),
                (
                    "deploy/base/kustomization.yaml",
                    "resources: [daemonset.yaml]\nimages: [{name: gamma-node, newTag: 0.1.0}]\n",
                ),
                (
                    "deploy/typo/kustomization.yaml",
                    &overlay("[{name: gamma-nod, newTag: dev}]"),
                ),
                (
                    "deploy/renamed-by-typo/kustomization.yaml",
                    &overlay("[{name: gamma_node, newName: gamma-node, newTag: dev}]"),
                ),
                (
                    "deploy/registry/kustomization.yaml",
                    &overlay("[{name: gamma-node, newName: 'r.io:5000/g', newTag: '2'}]"),
                ),
                ("deploy/bare/daemonset.yaml", AGENT_DAEMONSET),
                (
                    "deploy/bare/kustomization.yaml",
                    "resources: [daemonset.yaml]\n",
                ),
            ],
        );
        let root = &dir.0;
        let check = |kustomization: &str, version: &str| {
            let dir = root.join("deploy").join(kustomization);
            let docs = render(&dir, root).unwrap();
            let agent = Agent::find(&docs).unwrap();
            check_image(&dir, root, &docs, &agent, &Ok(version.to_owned()))
        };
        let container = "DaemonSet gamma-system/agent, spec.template.spec.containers[0]";

        assert_eq!(
            check("base", "0.1.0"),
            Ok("gamma-node:0.1.0, set by deploy/base/kustomization.yaml, images[0]".into())
        );
        assert_eq!(
            check("base", "0.2.0"),
            Err(vec![
                "deploy/base/kustomization.yaml, images[0]: the base's image tag is \
                      0.1.0, proxy-agent's version is 0.2.0"
                    .to_owned()
            ])
        );
        // The overlay's rule matches nothing: the base's rule still sets the image.
        assert_eq!(
            check("typo", "0.1.0"),
            Err(vec![
                "deploy/typo/kustomization.yaml, images[0]: no rendered image is \
                      `gamma-nod:dev`: no container image is named `gamma-nod`, so this rule \
                      changes nothing"
                    .to_owned()
            ])
        );
        let problems = check("renamed-by-typo", "0.1.0").unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(
            problems[0].contains("no container image is named `gamma_node`"),
            "{problems:#?}"
        );
        assert_eq!(
            problems[1],
            "deploy/renamed-by-typo/kustomization.yaml, images[0]: sets `gamma-node:dev`, but the \
             agent's image renders as `gamma-node:0.1.0`"
        );
        // A registry with a port: its colon is no tag.
        assert_eq!(
            check("registry", "0.1.0"),
            Ok("r.io:5000/g:2, set by deploy/registry/kustomization.yaml, images[0]".into())
        );
        assert_eq!(
            check("bare", "0.1.0"),
            Err(vec![format!(
                "{container}: image `gamma-node` is set by no `images:` entry of deploy/bare or \
                 its bases"
            )])
        );
    }

    #[test]
    fn image_references_split_into_name_tag_and_digest() {
        assert_eq!(split_image("gamma-node"), ("gamma-node", None, None));
        assert_eq!(
            split_image("r.io:5000/g:1"),
            ("r.io:5000/g", Some("1"), None)
        );
        assert_eq!(
            split_image("a/b:1@sha256:00"),
            ("a/b", Some("1"), Some("sha256:00"))
        );
    }

    /// The repository's own deploy/ folder. The checks that need the agent binary run when
    /// target/debug/proxy-agent knows --print-rbac and --print-flags (`cargo xtask test` builds it
    /// first); otherwise they are reported as skipped, never silently passed.
    #[test]
    fn the_deploy_folder_passes() {
        let root = util::workspace_root();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let binary = target.join("debug/proxy-agent");
        let options = Options {
            agent: Some(binary.clone()),
            ..Default::default()
        };
        let mut facts = AgentFacts::gather(&options, &root);
        let binary_error = facts.rbac.as_ref().err().or(facts.flags.as_ref().err());
        let binary_ready = binary_error.is_none();
        if let Some(error) = binary_error {
            skip(
                "xtask check_deploy::tests::the_deploy_folder_passes (rbac, flags)",
                &format!(
                    "{} is not built or lacks --print-rbac or --print-flags: {error}",
                    binary.display(),
                ),
            );
            facts.flags = Err("skipped".into());
        }
        let mut problems = Vec::new();
        if let Err(e) = parse_all(&root.join("deploy"), &root) {
            problems.extend(e);
        }
        let mut dirs = Vec::new();
        find_kustomizations(&root.join("deploy"), &mut dirs).unwrap();
        assert!(dirs.len() >= 2, "{dirs:?}");
        for dir in &dirs {
            let docs = match render(dir, &root) {
                Ok(docs) => docs,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            for (name, outcome) in check_rendered(dir, &root, &docs, &facts) {
                let needs_binary = matches!(name, "(a) rbac" | "(b) flags");
                if let Err(e) = outcome {
                    if binary_ready || !needs_binary {
                        problems.extend(
                            e.into_iter()
                                .map(|p| format!("{}: {name}: {p}", dir.display())),
                        );
                    }
                }
            }
        }
        assert!(problems.is_empty(), "{problems:#?}");
    }

    fn skip(test: &str, reason: &str) {
        eprintln!("SKIPPED: {test}: {reason}");
        if let Some(path) = std::env::var_os("GAMMA_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut file) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(file, "{test}: {reason}");
            }
        }
    }
}
