//! A cluster simulated from manifests, as the node harness and the engine tests need it:
//! Services get ClusterIPs, Deployments become Pods with upstream-like names and IPs, and
//! EndpointSlices are derived from the selectors, as the Kubernetes controllers would.

use anyhow::{bail, Context, Result};
use gamma_engine::manifests::documents;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

/// Address plan: ClusterIPs from `service_base`, pod IPs from `pod_base` (both /16, IPv4).
#[derive(Clone, Copy, Debug)]
pub struct AddressPlan {
    pub service_base: Ipv4Addr,
    pub pod_base: Ipv4Addr,
}

impl Default for AddressPlan {
    fn default() -> Self {
        AddressPlan {
            service_base: Ipv4Addr::new(10, 96, 0, 0),
            pod_base: Ipv4Addr::new(10, 244, 0, 0),
        }
    }
}

fn nth(base: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n)
}

#[derive(Clone, Debug)]
pub struct SimService {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: IpAddr,
    pub manifest: Value,
}

#[derive(Clone, Debug)]
pub struct SimPod {
    pub namespace: String,
    pub name: String,
    pub deployment: String,
    pub ip: IpAddr,
    /// Its IPv6 address on a dual-stack node ([`SimCluster::dual_stack`]).
    pub ip6: Option<std::net::Ipv6Addr>,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// From the Deployment's template.
    pub annotations: BTreeMap<String, String>,
    /// Container ports by name ("" for unnamed) and number.
    pub container_ports: Vec<(String, u16)>,
}

impl SimPod {
    /// Whether `other` is the same Pod (by namespace and name).
    pub fn same_pod(&self, other: &SimPod) -> bool {
        self.namespace == other.namespace && self.name == other.name
    }
}

#[derive(Clone, Debug, Default)]
pub struct SimCluster {
    pub namespaces: Vec<String>,
    pub services: Vec<SimService>,
    pub pods: Vec<SimPod>,
}

/// A short, stable lower-case alphanumeric "hash", like the ReplicaSet and Pod suffixes.
fn suffix(seed: &str, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h: u64 = 0xcbf29ce484222325;
    for b in seed.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    (0..len)
        .map(|_| {
            let c = ALPHABET[(h % ALPHABET.len() as u64) as usize] as char;
            h = h.wrapping_mul(0x100000001b3).rotate_left(7) ^ 0x9E37;
            c
        })
        .collect()
}

fn labels(value: Option<&Value>) -> BTreeMap<String, String> {
    value
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

impl SimCluster {
    /// Builds the cluster from the base manifests (Namespaces, Deployments, Services).
    pub fn from_manifests(file: &Path, plan: AddressPlan) -> Result<SimCluster> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let documents: Vec<Value> = match documents(&text) {
            Ok(d) => d.into_iter().map(|(_, v)| v).collect(),
            Err((n, message)) => bail!("{} document {n}: {message}", file.display()),
        };
        let mut cluster = SimCluster::default();
        for doc in &documents {
            let ns = doc["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            match doc["kind"].as_str() {
                Some("Namespace") => cluster.namespaces.push(name),
                Some("Deployment") => {
                    let replicas = doc["spec"]["replicas"].as_u64().unwrap_or(1);
                    let template = &doc["spec"]["template"];
                    let container_ports = template["spec"]["containers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                        .filter_map(|p| {
                            Some((
                                p["name"].as_str().unwrap_or_default().to_string(),
                                p["containerPort"].as_u64()? as u16,
                            ))
                        })
                        .collect::<Vec<_>>();
                    let rs = suffix(&format!("{ns}/{name}"), 10);
                    for i in 0..replicas {
                        let pod_name =
                            format!("{name}-{rs}-{}", suffix(&format!("{ns}/{name}/{i}"), 5));
                        let ip = IpAddr::V4(nth(plan.pod_base, cluster.pods.len() as u32 + 2));
                        cluster.pods.push(SimPod {
                            uid: format!("00000000-0000-4000-8000-{:012x}", cluster.pods.len() + 1),
                            namespace: ns.clone(),
                            name: pod_name,
                            deployment: name.clone(),
                            ip,
                            ip6: None,
                            labels: labels(template["metadata"].get("labels")),
                            annotations: labels(template["metadata"].get("annotations")),
                            container_ports: container_ports.clone(),
                        });
                    }
                }
                Some("Service") => {
                    let ip = IpAddr::V4(nth(plan.service_base, cluster.services.len() as u32 + 10));
                    let mut manifest = doc.clone();
                    manifest["spec"]["clusterIP"] = json!(ip.to_string());
                    manifest["spec"]["clusterIPs"] = json!([ip.to_string()]);
                    cluster.services.push(SimService {
                        namespace: ns,
                        name,
                        cluster_ip: ip,
                        manifest,
                    });
                }
                _ => {}
            }
        }
        Ok(cluster)
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&SimService> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
    }

    /// Resolves a host as cluster DNS would for a client in `client_namespace`:
    /// `svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`, or an IP.
    /// The cases' placeholder `<status.podIP of first pod matching SELECTOR in NAMESPACE …>`
    /// resolves to that pod's IP.
    pub fn resolve(&self, host: &str, client_namespace: &str) -> Option<IpAddr> {
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse() {
            return Some(ip);
        }
        if let Some(name) = host
            .strip_prefix("<ClusterIP of ")
            .and_then(|r| r.strip_suffix('>'))
        {
            return self.service(client_namespace, name).map(|s| s.cluster_ip);
        }
        if let Some(rest) = host.strip_prefix("<status.podIP of first pod matching ") {
            let mut words = rest.split_whitespace();
            let selector = words.next()?;
            let namespace = words.nth(1)?;
            return self.client(namespace, selector).map(|p| p.ip);
        }
        let host = host
            .trim_end_matches('.')
            .trim_end_matches(".cluster.local")
            .trim_end_matches(".svc");
        let (name, ns) = host.split_once('.').unwrap_or((host, client_namespace));
        self.service(ns, name).map(|s| s.cluster_ip)
    }

    /// The first Pod (by name) of a namespace whose labels include `selector` ("k=v,k=v").
    pub fn client(&self, namespace: &str, selector: &str) -> Option<&SimPod> {
        let wanted: Vec<(&str, &str)> = selector
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let mut pods: Vec<&SimPod> = self
            .pods
            .iter()
            .filter(|p| {
                p.namespace == namespace
                    && wanted
                        .iter()
                        .all(|(k, v)| p.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        pods.first().copied()
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&SimPod> {
        self.pods.iter().find(|p| p.ip == ip)
    }

    /// Every Pod (or, with `except`, every other) opted in to the agent's `--local-sockets`, and
    /// `except` out of it.
    pub fn with_local_sockets(mut self, except: Option<&SimPod>) -> SimCluster {
        for pod in &mut self.pods {
            let opted_in = except.is_none_or(|e| !e.same_pod(pod));
            pod.annotations.insert(
                gamma_engine::model::LOCAL_SOCKETS_ANNOTATION.into(),
                opted_in.to_string(),
            );
        }
        self
    }

    /// Dual-stack: every Pod gets an IPv6 address in `fd00:244::/64` and every Service an IPv6
    /// ClusterIP in [`crate::node::SERVICE_CIDR6`] (`PreferDualStack`), each numbered as its IPv4
    /// one. Endpoints stay IPv4.
    pub fn dual_stack(self) -> Self {
        self.dual_stack_pods().dual_stack_services()
    }

    /// The Pods of [`SimCluster::dual_stack`], with the Services still single-stack: a
    /// dual-stack cluster before its first dual-stack Service.
    pub fn dual_stack_pods(mut self) -> Self {
        for pod in &mut self.pods {
            pod.ip6 = Some(numbered_v6([0xfd00, 0x244, 0, 0], pod.ip));
        }
        self
    }

    /// The Services of [`SimCluster::dual_stack`].
    pub fn dual_stack_services(mut self) -> Self {
        for service in &mut self.services {
            let ip6 = numbered_v6([0xfd00, 0x96, 0, 0], service.cluster_ip);
            let spec = &mut service.manifest["spec"];
            spec["clusterIPs"] = json!([service.cluster_ip.to_string(), ip6.to_string()]);
            spec["ipFamilies"] = json!(["IPv4", "IPv6"]);
            spec["ipFamilyPolicy"] = json!("PreferDualStack");
        }
        self
    }

    /// The IPv6 ClusterIP of a Service ([`SimCluster::dual_stack`]).
    pub fn resolve6(&self, name: &str, namespace: &str) -> Option<std::net::Ipv6Addr> {
        let service = self
            .services
            .iter()
            .find(|s| s.name == name && s.namespace == namespace)?;
        service.manifest["spec"]["clusterIPs"]
            .as_array()?
            .iter()
            .filter_map(|ip| ip.as_str()?.parse().ok())
            .next()
    }

    /// Services (with ClusterIPs), Pods and derived EndpointSlices, as API objects.
    pub fn manifests(&self) -> Vec<Value> {
        let mut out: Vec<Value> = self.services.iter().map(|s| s.manifest.clone()).collect();
        for pod in &self.pods {
            let pod_ips: Vec<Value> = std::iter::once(pod.ip)
                .chain(pod.ip6.map(IpAddr::V6))
                .map(|ip| json!({"ip": ip.to_string()}))
                .collect();
            out.push(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid, "labels": pod.labels, "annotations": pod.annotations},
                "spec": {"nodeName": "node", "containers": []},
                "status": {"podIP": pod.ip.to_string(), "podIPs": pod_ips},
            }));
        }
        out.extend(self.services.iter().filter_map(|s| self.endpoint_slice(s)));
        out
    }

    /// Per Service port: (port, port name, target port, endpoint pod IPs), as the EndpointSlice
    /// controller would derive them from the selector. Empty for a Service without a selector.
    pub fn endpoints(&self, service: &SimService) -> Vec<(u16, String, u16, Vec<IpAddr>)> {
        let selector = labels(service.manifest["spec"].get("selector"));
        if selector.is_empty() {
            return Vec::new();
        }
        let pods: Vec<&SimPod> = self
            .pods
            .iter()
            .filter(|p| {
                p.namespace == service.namespace
                    && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            })
            .collect();
        service.manifest["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let port = p["port"].as_u64().unwrap_or(0) as u16;
                let target = match &p["targetPort"] {
                    Value::Number(n) => n.as_u64().unwrap_or(u64::from(port)) as u16,
                    Value::String(name) => pods
                        .first()
                        .and_then(|pod| pod.container_ports.iter().find(|(n, _)| n == name))
                        .map_or(0, |(_, p)| *p),
                    _ => port,
                };
                (
                    port,
                    p["name"].as_str().unwrap_or_default().to_string(),
                    target,
                    pods.iter().map(|p| p.ip).collect(),
                )
            })
            .collect()
    }

    /// The EndpointSlice the controller would write for a Service with a selector.
    fn endpoint_slice(&self, service: &SimService) -> Option<Value> {
        let ports = self.endpoints(service);
        let first = ports.first()?;
        let pod_name = |ip: &IpAddr| {
            self.pod_by_ip(*ip)
                .map(|p| p.name.clone())
                .unwrap_or_default()
        };
        let endpoints: Vec<Value> = first
            .3
            .iter()
            .map(|ip| json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "node",
                "targetRef": {"kind": "Pod", "name": pod_name(ip), "namespace": service.namespace},
            }))
            .collect();
        let ports: Vec<Value> = ports
            .iter()
            .map(|(_, name, target, _)| json!({"name": name, "port": target, "protocol": "TCP"}))
            .collect();
        Some(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-{}", service.name, suffix(&service.name, 5)), "namespace": service.namespace,
                          "labels": {"kubernetes.io/service-name": service.name}},
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
    }
}

/// The IPv6 address in `prefix`/64 numbered as `v4` (its last two bytes).
fn numbered_v6(prefix: [u16; 4], v4: IpAddr) -> std::net::Ipv6Addr {
    let IpAddr::V4(v4) = v4 else {
        unreachable!("the plan numbers IPv4")
    };
    let [_, _, hi, lo] = v4.octets();
    let [a, b, c, d] = prefix;
    std::net::Ipv6Addr::new(a, b, c, d, 0, 0, 0, u16::from_be_bytes([hi, lo]))
}
