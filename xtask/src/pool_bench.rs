//! `cargo xtask bench-pool`: the criterion pool benchmark run several times, its medians read
//! back from criterion's estimates and laid out as the tables in docs/PERFORMANCE.md.

use std::{fmt::Write, path::Path, process::Command};

use anyhow::{Context, Result, bail};

const ROWS: [&str; 6] = [
    "lockfree",
    "mutex",
    "arrayqueue",
    "lockfree+cache",
    "mutex+cache",
    "arrayqueue+cache",
];
const BATCHES: [usize; 3] = [1, 16, 64];
const GROUPS: [&str; 2] = ["single_thread", "cross_thread"];

/// ns per frame, indexed `[group][row][batch]`, one entry per run.
type Samples = Vec<Vec<Vec<Vec<f64>>>>;

pub fn run(root: &Path, target: &Path, repeats: usize) -> Result<String> {
    if repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let mut samples: Samples =
        vec![vec![vec![Vec::new(); BATCHES.len()]; ROWS.len()]; GROUPS.len()];
    for r in 0..repeats {
        eprintln!("xtask: pool benchmark, run {} of {repeats}", r + 1);
        let status = Command::new("cargo")
            .current_dir(root)
            .args(["bench", "-p", "relay", "--bench", "pool"])
            .status()?;
        if !status.success() {
            bail!("cargo bench failed: {status}");
        }
        for (g, group) in GROUPS.iter().enumerate() {
            for (i, row) in ROWS.iter().enumerate() {
                for (b, batch) in BATCHES.iter().enumerate() {
                    let ns = median_ns(target, group, row, *batch)?;
                    // The single-thread case times one batch per iteration; the cross-thread
                    // case counts frames as iterations.
                    let per_frame = if *group == "single_thread" {
                        ns / *batch as f64
                    } else {
                        ns
                    };
                    samples[g][i][b].push(per_frame);
                }
            }
        }
    }
    Ok(render(&samples))
}

fn median_ns(target: &Path, group: &str, row: &str, batch: usize) -> Result<f64> {
    let path = target.join(format!(
        "criterion/{group}/{row}/{batch}/new/estimates.json"
    ));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v["median"]["point_estimate"]
        .as_f64()
        .with_context(|| format!("{} has no median", path.display()))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn cell(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    format!("{:.2} ({lo:.2}-{hi:.2})", median(v))
}

fn render(s: &Samples) -> String {
    let mut out = String::new();
    let titles = [
        "**One thread, uncontended** — ns per frame for a take and its give-back:",
        "**Two threads, every frame taken on one and given back on the other** (pinned to two \
         CPUs; the frames travel from the taker to the giver through a 256-entry single-producer \
         single-consumer ring, as frames travel through the TX and completion rings, whose cost \
         is included) — ns per frame:",
    ];
    for (g, title) in titles.iter().enumerate() {
        let _ = writeln!(
            out,
            "{title}\n\n| ns per frame | batch 1 | batch 16 | batch 64 |\n|---|---|---|---|"
        );
        for (i, row) in ROWS.iter().enumerate() {
            let cells: Vec<String> = s[g][i].iter().map(|v| cell(v)).collect();
            let _ = writeln!(out, "| {row} | {} |", cells.join(" | "));
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "Ratios of the medians, mutex ÷ lock-free (above 1: lock-free faster):\n\n\
         | | batch 1 | batch 16 | batch 64 |\n|---|---|---|---|"
    );
    let pairs = [
        ("one thread", 0, 0, 1),
        ("one thread with cache", 0, 3, 4),
        ("cross-thread", 1, 0, 1),
        ("cross-thread with cache", 1, 3, 4),
    ];
    for (name, g, lf, mx) in pairs {
        let cells: Vec<String> = (0..BATCHES.len())
            .map(|b| format!("{:.2}", median(&s[g][mx][b]) / median(&s[g][lf][b])))
            .collect();
        let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
    }
    out
}
