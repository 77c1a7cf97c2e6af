//! Network namespaces that delete themselves, and running code inside one.

use std::{
    fs::File,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name no other test, run or process on this machine is using: prefix, pid, sequence.
pub fn unique_name(role: &str) -> String {
    format!(
        "rly{}-{}-{role}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named network namespace, deleted (with every interface in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

/// Deletes namespaces that an earlier harness process left behind when it was killed before
/// its guards could run (their names carry the pid, and that pid is gone).
fn sweep_orphans() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(list) = sh(&["ip", "netns", "list"]) else {
            return;
        };
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(pid) = name
                .strip_prefix("rly")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = sh(&["ip", "netns", "del", name]);
            }
        }
    });
}

impl Netns {
    pub fn new(role: &str) -> Result<Self> {
        sweep_orphans();
        let name = unique_name(role);
        sh(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace; fails with its stderr if it fails.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it opens live here.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs a command; its stdout on success, an error with stderr otherwise.
pub fn sh(args: &[&str]) -> Result<String> {
    let out: Output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The harness needs root for namespaces, XDP and AF_XDP.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the veth-namespace tests need root (namespaces, XDP, AF_XDP): run them with sudo"
    );
}
