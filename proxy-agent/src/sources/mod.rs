//! Where objects come from: a folder of manifests (`file`). Sources translate the outside world
//! into `apply`/`delete` calls on the index and know nothing of routing.

pub mod file;
