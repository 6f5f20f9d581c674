//! Route, endpoint and Pod churn many times a second under load, with API server outages, through
//! `proxy-agent --kube` against the fake API server (`gamma_tests::churn`; on 127.0.0.1, no root
//! needed): no request fails, each outage is reported stale and caught up with, the final state
//! is served, and memory does not grow with the changes. The longer run: `cargo xtask soak churn`.

use gamma_tests::churn::{self, ChurnConfig};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_and_outages_under_load_fail_nothing() {
    let started = Instant::now();
    let config = ChurnConfig {
        duration: Duration::from_secs(20),
        changes_per_second: 20,
        outages: 2,
        outage: Duration::from_secs(2),
        keep_alive: 2,
        new_connection: 1,
        http2: 1,
    };
    let report = churn::run(&config).await.unwrap();
    eprint!("{report}");
    let problems = report.problems(&config);
    assert!(problems.is_empty(), "{problems:#?}\n{report}");
    assert!(
        report.load.sent > 500,
        "too little load to mean anything: {report}"
    );
    // 20 changes a second for 20 s, less what the outages and scheduling delays cost.
    assert!(report.changes.total() >= 300, "too few changes: {report}");
    // A new table at most every 100 ms (the publisher's pace; 20 changes a second give about
    // 10), none during the outages; at least a few a second while the server serves.
    let seconds = config.duration.as_secs();
    assert!(
        (2 * seconds..=10 * seconds + 20).contains(&report.published),
        "snapshots published for the changes at 10 a second at most, and not far fewer: {report}"
    );
    // Memory: the agent's table is the same size at the end as at the start; what grows with
    // the changes is a leak. The bound leaves room for allocator noise in a debug build.
    let growth = report.rss_growth_kib().expect("RSS samples");
    assert!(growth < 4 * 1024, "RSS grew by {growth} KiB: {report}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
