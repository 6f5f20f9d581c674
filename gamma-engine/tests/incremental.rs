//! Incremental equals from scratch, as a property: for any sequence of applies and deletes of
//! Services, EndpointSlices, Pods and routes (publishing at random points), the index's snapshot
//! equals the one an index built from scratch from the surviving objects publishes: frontends and
//! their tables, the addresses the kernel steers, callers, and every route's status. The pool of
//! objects and the check are in `support/incremental.rs` (shared with the fuzz target
//! `index_ops`).

#[path = "support/incremental.rs"]
mod support;

use proptest::prelude::*;
use support::{incremental_and_scratch, pool, Step};

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let n = pool().len();
    let step =
        (0..n, prop::bool::weighted(0.25), any::<bool>()).prop_map(|(object, delete, publish)| {
            Step {
                object,
                delete,
                publish,
            }
        });
    prop::collection::vec(step, 1..40)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn incremental_equals_from_scratch(steps in steps()) {
        let (incremental, scratch) = incremental_and_scratch(&pool(), &steps);
        prop_assert_eq!(incremental, scratch);
    }
}
