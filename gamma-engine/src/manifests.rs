//! Manifests: the YAML (or JSON) text `kubectl apply` takes, parsed into objects. Pure: no I/O.
//!
//! Multi-document texts and `List` kinds are read; kinds the engine does not use are skipped with
//! a warning; an invalid document is reported (file, document, field) and the rest still loads.
//! An invalid document whose identity (kind, namespace, name) can still be read is listed in
//! [`Parsed::invalid`], so that a caller can keep that object's last good version.

use crate::model::{Object, ObjectError};
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Severity {
    Warning,
    Error,
}

/// Something wrong with a manifest, located precisely enough to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub file: PathBuf,
    /// 1-based document number within the file (0: the whole file).
    pub document: usize,
    /// `Kind namespace/name` when known.
    pub object: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.severity {
            Severity::Warning => "skipped",
            Severity::Error => "rejected",
        };
        write!(f, "{}", self.file.display())?;
        if self.document > 0 {
            write!(f, " document {}", self.document)?;
        }
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        write!(f, ": {what}: {}", self.message)
    }
}

/// A document that did not convert but whose identity is known, so its last good state can stay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl Identity {
    /// `Kind namespace/name`, or `Kind name` for a cluster-scoped kind: what
    /// [`Object::describe`] says of the object it would have been.
    pub fn describe(&self) -> String {
        match self.kind.as_str() {
            "Node" | "Namespace" => format!("{} {}", self.kind, self.name),
            _ => format!("{} {}/{}", self.kind, self.namespace, self.name),
        }
    }
}

/// What one file holds.
#[derive(Debug, Default)]
pub struct Parsed {
    pub objects: Vec<Object>,
    pub problems: Vec<Problem>,
    /// Invalid documents that can be identified: their previous objects are kept.
    pub invalid: Vec<Identity>,
    /// The YAML itself did not parse: nothing in the file can be trusted.
    pub unreadable: bool,
}

/// Every document of a YAML text as JSON, with its 1-based document number; the items of `List`
/// kinds are expanded in place. Fails with the document number if the YAML does not parse.
pub fn documents(text: &str) -> Result<Vec<(usize, serde_json::Value)>, (usize, String)> {
    let mut out = Vec::new();
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let number = i + 1;
        let value = match serde::Deserialize::deserialize(document).map(yaml_to_json) {
            Ok(Some(v)) => v,
            Ok(None) => continue, // an empty document
            Err(e) => return Err((number, format!("not valid YAML: {e}"))),
        };
        if value
            .get("kind")
            .and_then(|k| k.as_str())
            .is_some_and(|k| k.ends_with("List"))
        {
            let items = value
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default();
            out.extend(items.into_iter().map(|item| (number, item)));
        } else {
            out.push((number, value));
        }
    }
    Ok(out)
}

/// Parses the text of one manifest file. Pure: no I/O.
pub fn parse(file: &Path, text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    let problem = |severity, document, object, message: String| Problem {
        severity,
        file: file.to_path_buf(),
        document,
        object,
        message,
    };
    let documents = match documents(text) {
        Ok(d) => d,
        Err((number, message)) => {
            parsed
                .problems
                .push(problem(Severity::Error, number, None, message));
            parsed.unreadable = true;
            return parsed;
        }
    };
    for (number, item) in documents {
        let identity = identity(&item);
        let shown = identity.as_ref().map(Identity::describe);
        match Object::from_value(item) {
            Ok(object) => parsed.objects.push(object),
            Err(ObjectError::UnknownKind { kind, api_version }) => {
                parsed.problems.push(problem(
                    Severity::Warning,
                    number,
                    shown,
                    format!("kind `{kind}` ({api_version}) is not used by the agent"),
                ));
            }
            Err(e) => {
                parsed
                    .problems
                    .push(problem(Severity::Error, number, shown, e.to_string()));
                parsed.invalid.extend(identity);
                // The route's status reports the refused generation.
                if let Some(refused) = e.refused_route() {
                    parsed.objects.push(Object::RefusedRoute(refused.clone()));
                }
            }
        }
    }
    parsed
}

fn identity(value: &serde_json::Value) -> Option<Identity> {
    let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_string);
    let meta = value.get("metadata");
    Some(Identity {
        api_version: text(value.get("apiVersion"))?,
        kind: text(value.get("kind"))?,
        namespace: text(meta.and_then(|m| m.get("namespace")))
            .unwrap_or_else(|| "default".to_string()),
        name: text(meta.and_then(|m| m.get("name")))?,
    })
}

/// YAML → JSON (`None` for an empty document). YAML-only forms (non-string keys) become strings.
fn yaml_to_json(value: serde_yaml_ng::Value) -> Option<serde_json::Value> {
    use serde_json::Value as J;
    use serde_yaml_ng::Value as Y;
    fn convert(v: Y) -> J {
        match v {
            Y::Null => J::Null,
            Y::Bool(b) => J::Bool(b),
            Y::Number(n) => serde_json::to_value(&n).unwrap_or(J::Null),
            Y::String(s) => J::String(s),
            Y::Sequence(s) => J::Array(s.into_iter().map(convert).collect()),
            Y::Mapping(m) => J::Object(
                m.into_iter()
                    .map(|(k, v)| {
                        let key = match k {
                            Y::String(s) => s,
                            other => serde_yaml_ng::to_string(&other)
                                .unwrap_or_default()
                                .trim()
                                .to_string(),
                        };
                        (key, convert(v))
                    })
                    .collect(),
            ),
            Y::Tagged(t) => convert(t.value),
        }
    }
    match value {
        Y::Null => None,
        v => Some(convert(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: ns}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]\n";

    #[test]
    fn multi_document_list_unknown_and_invalid() {
        let text = format!(
            "{SERVICE}---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {{name: p, namespace: ns}}\n  status: {{podIP: 10.0.0.5}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: ns}}\nspec:\n  ports: [{{port: 99999}}]\n---\n"
        );
        let parsed = parse(Path::new("m.yaml"), &text);
        assert_eq!(parsed.objects.len(), 2, "{:?}", parsed.problems);
        assert_eq!(parsed.problems.len(), 2);
        assert_eq!(parsed.problems[0].severity, Severity::Warning);
        assert!(
            parsed.problems[0].to_string().contains("m.yaml document 3"),
            "{}",
            parsed.problems[0]
        );
        let error = parsed.problems[1].to_string();
        assert!(
            error.contains("document 4")
                && error.contains("Service ns/bad")
                && error.contains("spec.ports[0].port"),
            "{error}"
        );
        assert_eq!(parsed.invalid.len(), 1);
    }

    /// A Pod's own annotation decides, whatever its value ("true": in); without one, its
    /// Namespace's ("true": in). Read back from the published callers.
    #[test]
    fn a_pod_opts_in_to_local_sockets_by_its_annotation_or_its_namespaces() {
        let namespace = |name: &str, annotated: bool| {
            let annotations = if annotated {
                ", annotations: {gamma-node.io/local-sockets: \"true\"}"
            } else {
                ""
            };
            format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}{annotations}}}\n")
        };
        let pods = [
            ("team", "", "10.0.0.1"),
            ("team", "false", "10.0.0.2"),
            ("other", "", "10.0.0.3"),
            ("other", "true", "10.0.0.4"),
            ("other", "yes", "10.0.0.5"),
        ]
        .map(|(namespace, value, ip)| {
            let annotations = if value.is_empty() {
                String::new()
            } else {
                format!(", annotations: {{gamma-node.io/local-sockets: \"{value}\"}}")
            };
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{ip}, namespace: {namespace}{annotations}}}\nstatus: {{podIP: {ip}}}\n"
            )
        });
        let mut index = crate::index::Index::new();
        let mut apply = |text: &str| {
            for object in parse(Path::new("x.yaml"), text).objects {
                index.apply(object);
            }
            index.publish();
            let snapshot = index.snapshot();
            (1..=5)
                .map(|i| {
                    let ip = format!("10.0.0.{i}").parse().unwrap();
                    snapshot.caller(ip).expect("a caller").local_sockets
                })
                .collect::<Vec<_>>()
        };
        let world = [namespace("team", true), namespace("other", false)];
        assert_eq!(
            apply(
                &world
                    .iter()
                    .chain(&pods)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("---\n")
            ),
            [true, false, false, true, false]
        );
        assert_eq!(
            apply(&namespace("team", false)),
            [false, false, false, true, false],
            "the namespace opted out again"
        );
        assert_eq!(
            apply(&namespace("other", true)),
            [false, false, true, true, false]
        );
    }

    #[test]
    fn schema_mismatch_names_the_field() {
        let text = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: ns}\nspec:\n  rules:\n  - backendRefs:\n    - name: x\n      port: notanumber\n";
        let parsed = parse(Path::new("r.yaml"), text);
        // Refused: its status says why, and no route generation is built from it.
        assert!(
            matches!(parsed.objects[..], [Object::RefusedRoute(_)]),
            "{:?}",
            parsed.objects
        );
        assert!(
            parsed.problems[0]
                .message
                .contains("spec.rules[0].backendRefs[0].port"),
            "{}",
            parsed.problems[0]
        );
    }
}
