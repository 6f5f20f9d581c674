//! Where objects come from: a folder of manifests (`file`) or a cluster (`kube`). Sources
//! translate the outside world into `apply`/`delete` calls on the index and know nothing of
//! routing.

pub mod file;
pub mod kube;
