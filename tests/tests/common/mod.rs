//! Helpers the end-to-end test files share.

use std::{path::Path, time::Duration};

use relay::stats::StatsView;
use relay_tests::relay_proc::relay_bin;

/// `relay stats --json` against `control`, polled until `done` holds or three seconds pass;
/// the last answer either way.
pub fn stats_until(control: &Path, done: impl Fn(&StatsView) -> bool) -> StatsView {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let out = std::process::Command::new(relay_bin())
            .args(["stats", "--json", "--control"])
            .arg(control)
            .output()
            .unwrap();
        let v: StatsView = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        if done(&v) || std::time::Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
