//! `cargo xtask bench-datapath`: the criterion data path benchmark (relay/benches/datapath.rs)
//! run several times, its estimates read back and laid out with both allocators side by side,
//! as the table in docs/PERFORMANCE.md.

use std::{fmt::Write, path::Path, process::Command};

use anyhow::{Context, Result, bail};

const ALLOCATORS: [&str; 2] = ["lockfree", "mutex"];

/// ns per frame of each run.
#[derive(Default)]
struct Samples {
    /// The simulated kernel alone at 1->1 and 1->8.
    kernel: [Vec<f64>; 2],
    /// `[workers - 1][allocator][1->1, 1->8]`.
    rows: [[[Vec<f64>; 2]; 2]; 2],
}

pub fn run(root: &Path, target: &Path, repeats: usize) -> Result<String> {
    if repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let mut s = Samples::default();
    for r in 0..repeats {
        eprintln!("xtask: data path benchmark, run {} of {repeats}", r + 1);
        let status = Command::new("cargo")
            .current_dir(root)
            .args(["bench", "-p", "relay", "--bench", "datapath"])
            .status()?;
        if !status.success() {
            bail!("cargo bench failed: {status}");
        }
        s.kernel[0].push(estimate(target, "datapath_kernel/bounce")?);
        s.kernel[1].push(estimate(target, "datapath_kernel/bounce8")?);
        for w in 0..2 {
            for (a, alloc) in ALLOCATORS.iter().enumerate() {
                for (f, fanout) in ["1to1", "1to8"].iter().enumerate() {
                    let id = format!("datapath_w{}/{alloc}/{fanout}", w + 1);
                    s.rows[w][a][f].push(estimate(target, &id)?);
                }
            }
        }
    }
    Ok(render(&s))
}

/// Criterion's estimate of the time per iteration (one frame received): the slope of its
/// linear sampling, which leaves out what every sample pays once, else the median.
fn estimate(target: &Path, id: &str) -> Result<f64> {
    let path = target.join(format!("criterion/{id}/new/estimates.json"));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v["slope"]["point_estimate"]
        .as_f64()
        .or_else(|| v["median"]["point_estimate"].as_f64())
        .with_context(|| format!("{} has no slope or median", path.display()))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn cell(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    format!("{:.1} ({lo:.1}-{hi:.1})", median(v))
}

fn render(s: &Samples) -> String {
    let mut out = String::new();
    let kernel = [median(&s.kernel[0]), median(&s.kernel[1])];
    let kernel_extra = (kernel[1] - kernel[0]) / 7.0;
    let _ = writeln!(
        out,
        "ns per frame (64-byte payload; with one worker none is dropped, with two the time is \
         per frame delivered to every output), median of the runs (range); \"per extra \
         output\" is (1→8 − 1→1) / 7 of the medians:\n\n\
         | ns per frame | lock-free | mutex |\n|---|---|---|"
    );
    let _ = writeln!(
        out,
        "| the simulated kernel alone, 1→1 (bounce) | {} | — |",
        cell(&s.kernel[0])
    );
    let _ = writeln!(
        out,
        "| the simulated kernel alone, 1→8 (bounce8) | {} | — |",
        cell(&s.kernel[1])
    );
    let _ = writeln!(
        out,
        "| the simulated kernel alone, per extra output | {kernel_extra:.1} | — |"
    );
    for w in 0..2 {
        let m = |a: usize, f: usize| median(&s.rows[w][a][f]);
        let row = |f: usize| -> Vec<String> { (0..2).map(|a| cell(&s.rows[w][a][f])).collect() };
        let per = |a: usize| (m(a, 1) - m(a, 0)) / 7.0;
        let workers = if w == 0 {
            "1 worker"
        } else {
            "2 worker threads"
        };
        let _ = writeln!(out, "| {workers}, 1→1 | {} |", row(0).join(" | "));
        let _ = writeln!(out, "| {workers}, 1→8 | {} |", row(1).join(" | "));
        let _ = writeln!(
            out,
            "| {workers}, per extra output | {:.1} | {:.1} |",
            per(0),
            per(1)
        );
        if w == 0 {
            let _ = writeln!(
                out,
                "| **{workers}, 1→1, less the simulated kernel** | **{:.1}** | **{:.1}** |",
                m(0, 0) - kernel[0],
                m(1, 0) - kernel[0]
            );
            let _ = writeln!(
                out,
                "| **{workers}, per extra output, less the simulated kernel's** | **{:.1}** | **{:.1}** |",
                per(0) - kernel_extra,
                per(1) - kernel_extra
            );
        }
    }
    out
}
