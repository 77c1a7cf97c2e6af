//! `cargo xtask soak --minutes N`: a steady flow below the relay's measured capacity through a
//! rule with two outputs, and a reload every ten seconds that adds or removes another rule,
//! for N minutes. It fails if any datagram of the steady flow is lost or duplicated on either
//! output, if the relay's resident memory grows, or if a frame leaks at the end.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    genproc::{GenReceiver, GenSender, SendSpec, rss_kib},
    netns::require_root,
    relay_proc::{RelayProc, report_value},
    topo::{SENDER_ADDR, Topology},
};

const GROUP: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
const RULES: &str = "\
rules:
  - name: steady
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout0 }, { interface: rout1 }]
";
const EXTRA: &str = "  - name: extra
    input: { interface: rin, group: 239.3.3.3, port: 5000 }
    outputs: [{ interface: rout1 }]
";
/// Memory growth allowed between the first sample (after a minute, or a quarter of a short
/// run) and the last: allocator noise, not a leak.
const RSS_SLACK_KIB: u64 = 1024;

pub struct SoakOpts {
    pub minutes: f64,
    /// Packets per second of the steady flow.
    pub rate: u64,
    pub size: usize,
}

/// Runs the soak; returns a markdown summary, or an error saying what failed.
pub fn run(relay_bin: &Path, gen_bin: &Path, opts: &SoakOpts) -> Result<String> {
    require_root();
    let secs = opts.minutes * 60.0;
    let topo = Topology::new(2)?;
    let relay = RelayProc::start(relay_bin, &topo.relay, RULES, &[])?;
    let pid = relay.pid();
    let base = std::fs::read_to_string(&relay.config)?;
    let receivers = topo
        .receivers
        .iter()
        .map(|r| GenReceiver::spawn(gen_bin, &r.ns, GROUP, 5000, r.addr, 2000, secs + 30.0))
        .collect::<Result<Vec<_>>>()?;
    let spec = SendSpec {
        group: GROUP,
        port: 5000,
        source: SENDER_ADDR,
        size: opts.size,
        rate: opts.rate,
        duration_s: secs,
        cpu: None,
        afxdp: None,
    };
    let sender = GenSender::spawn(gen_bin, &topo.sender, &spec)?;

    let start = Instant::now();
    let warm = Duration::from_secs_f64((secs / 4.0).min(60.0));
    let mut reloads = 0u32;
    let mut rss: Vec<(f64, u64)> = Vec::new();
    let mut next_reload = Duration::from_secs(10);
    let mut next_sample = warm;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        std::thread::sleep(Duration::from_millis(200));
        let now = start.elapsed();
        if now >= next_sample {
            rss.push((now.as_secs_f64(), rss_kib(pid)?));
            next_sample += Duration::from_secs(10);
        }
        if now >= next_reload {
            next_reload += Duration::from_secs(10);
            let yaml = if reloads.is_multiple_of(2) {
                format!("{base}{EXTRA}")
            } else {
                base.clone()
            };
            std::fs::write(&relay.config, yaml)?;
            let out = Command::new(relay_bin)
                .args(["reload", "--control"])
                .arg(&relay.control)
                .output()?;
            if !out.status.success() {
                bail!(
                    "reload {reloads} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            reloads += 1;
        }
    }
    let sent = sender.finish()?;
    let got = receivers
        .into_iter()
        .map(GenReceiver::finish)
        .collect::<Result<Vec<_>>>()?;
    rss.push((start.elapsed().as_secs_f64(), rss_kib(pid)?));
    let exit = relay.stop(Duration::from_secs(5))?;

    let mut failures = Vec::new();
    for (i, g) in got.iter().enumerate() {
        if g.unique != sent.sent || g.duplicates != 0 {
            failures.push(format!(
                "rout{i}: {} of {} datagrams arrived ({} duplicates)",
                g.unique, sent.sent, g.duplicates
            ));
        }
    }
    let first = rss.first().map_or(0, |r| r.1);
    let last = rss.last().map_or(0, |r| r.1);
    if last > first + RSS_SLACK_KIB {
        failures.push(format!("RSS grew from {first} to {last} KiB: {rss:?}"));
    }
    if !exit.status.success() || !exit.stderr.contains("frames accounted for") {
        failures.push(format!(
            "the relay stopped badly ({}):\n{}",
            exit.status, exit.stderr
        ));
    }
    let leaked = report_value(&exit.stdout, &["frames"], "leaked").context("no frame account")?;
    if leaked != 0 {
        failures.push(format!("{leaked} frames leaked"));
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "| minutes | offered pps | sent | reloads | delivered rout0 | delivered rout1 | lost | RSS first → last (KiB) | frames leaked |\n|---|---|---|---|---|---|---|---|---|"
    );
    let lost: u64 = got.iter().map(|g| sent.sent.saturating_sub(g.unique)).sum();
    let _ = writeln!(
        out,
        "| {:.1} | {:.0} | {} | {reloads} | {} | {} | {lost} | {first} → {last} | {leaked} |",
        opts.minutes, sent.pps, sent.sent, got[0].unique, got[1].unique
    );
    if failures.is_empty() {
        Ok(out)
    } else {
        bail!("soak failed:\n{}\n\n{out}", failures.join("\n"))
    }
}
