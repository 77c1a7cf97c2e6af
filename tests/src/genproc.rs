//! `relay-gen` processes in namespaces: receivers that account for what arrives, and senders
//! at a rate or flat out. Shared by the benchmark, the overload test and the soak.

use std::{
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{
    loadgen::{RecvSummary, SendSummary},
    netns::Netns,
};

/// A running `relay-gen recv`; killed if dropped before [`GenReceiver::finish`] (a test
/// that fails half-way leaves no generator behind in a namespace it is removing).
pub struct GenReceiver {
    child: KillOnDrop,
}

/// A child process that is killed and reaped if it is still there when dropped.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn wait_with_output(mut self) -> std::io::Result<std::process::Output> {
        self.0.take().expect("taken once").wait_with_output()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl GenReceiver {
    /// Starts a receiver that joins `group` on the interface with `iface_addr` and returns
    /// once it has joined.
    pub fn spawn(
        gen_bin: &Path,
        ns: &Netns,
        group: Ipv4Addr,
        port: u16,
        iface_addr: Ipv4Addr,
        idle_ms: u64,
        max_secs: f64,
    ) -> Result<Self> {
        Self::start(
            gen_bin,
            ns,
            Some(group),
            port,
            iface_addr,
            idle_ms,
            max_secs,
        )
    }

    /// Starts a receiver of unicast datagrams to `addr`:`port` (bound there, joining
    /// nothing), the far end of a gateway output, and returns once it listens.
    pub fn spawn_unicast(
        gen_bin: &Path,
        ns: &Netns,
        addr: Ipv4Addr,
        port: u16,
        idle_ms: u64,
        max_secs: f64,
    ) -> Result<Self> {
        Self::start(gen_bin, ns, None, port, addr, idle_ms, max_secs)
    }

    fn start(
        gen_bin: &Path,
        ns: &Netns,
        group: Option<Ipv4Addr>,
        port: u16,
        iface_addr: Ipv4Addr,
        idle_ms: u64,
        max_secs: f64,
    ) -> Result<Self> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()]);
        // For the tail-latency evidence in docs/PERFORMANCE.md: the receivers kept off the
        // forwarder's CPU (RELAY_BENCH_RECEIVER_CPUS=0 puts them beside the sender).
        if let Ok(cpus) = std::env::var("RELAY_BENCH_RECEIVER_CPUS") {
            cmd.args(["taskset", "-c", &cpus]);
        }
        cmd.arg(gen_bin).arg("recv");
        if let Some(group) = group {
            cmd.args(["--group", &group.to_string()]);
        }
        let mut child = cmd
            .args(["--port", &port.to_string()])
            .args(["--iface-addr", &iface_addr.to_string()])
            .args([
                "--idle-ms",
                &idle_ms.to_string(),
                "--max-secs",
                &max_secs.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting a receiver")?;
        let mut line = String::new();
        BufReader::new(child.stderr.take().expect("piped")).read_line(&mut line)?;
        let child = KillOnDrop(Some(child));
        if line.trim() != "ready" {
            bail!("receiver did not start: {line}");
        }
        Ok(Self { child })
    }

    /// Waits for the receiver to stop (idle or at its time limit) and returns its account.
    pub fn finish(self) -> Result<RecvSummary> {
        let out = self.child.wait_with_output()?;
        serde_json::from_slice(&out.stdout).context("receiver output")
    }
}

/// What a sender sends.
#[derive(Debug, Clone)]
pub struct SendSpec {
    /// The group; for [`GenSender::spawn_unicast`], the unicast address.
    pub group: Ipv4Addr,
    pub port: u16,
    pub source: Ipv4Addr,
    /// UDP payload bytes.
    pub size: usize,
    /// Packets per second; 0 for flat out.
    pub rate: u64,
    pub duration_s: f64,
    pub cpu: Option<usize>,
    /// Send through an AF_XDP socket on this interface instead of a UDP socket.
    pub afxdp: Option<String>,
}

/// A running `relay-gen send`; killed if dropped before [`GenSender::finish`].
pub struct GenSender {
    child: KillOnDrop,
}

impl GenSender {
    pub fn spawn(gen_bin: &Path, ns: &Netns, spec: &SendSpec) -> Result<Self> {
        Self::start(gen_bin, ns, spec, None, 1)
    }

    /// As [`GenSender::spawn`], round-robin over `groups` consecutive groups from
    /// `spec.group`: the many groups one range rule matches.
    pub fn spawn_groups(gen_bin: &Path, ns: &Netns, spec: &SendSpec, groups: u32) -> Result<Self> {
        Self::start(gen_bin, ns, spec, None, groups)
    }

    /// As [`GenSender::spawn`], but to a unicast address: `spec.group` holds it, and
    /// `next_hop_mac` is the MAC an AF_XDP sender's frames go to (the UDP socket sender
    /// leaves that to its kernel's ARP).
    pub fn spawn_unicast(
        gen_bin: &Path,
        ns: &Netns,
        spec: &SendSpec,
        next_hop_mac: [u8; 6],
    ) -> Result<Self> {
        Self::start(gen_bin, ns, spec, Some(next_hop_mac), 1)
    }

    fn start(
        gen_bin: &Path,
        ns: &Netns,
        spec: &SendSpec,
        next_hop_mac: Option<[u8; 6]>,
        groups: u32,
    ) -> Result<Self> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()]).arg(gen_bin);
        match next_hop_mac {
            None => cmd.args(["send", "--group", &spec.group.to_string()]),
            Some(m) => cmd
                .args(["send", "--destination", &spec.group.to_string()])
                .args([
                    "--dst-mac",
                    &format!(
                        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                        m[0], m[1], m[2], m[3], m[4], m[5]
                    ),
                ]),
        };
        cmd.args(["--port", &spec.port.to_string()])
            .args(["--source", &spec.source.to_string()])
            .args([
                "--size",
                &spec.size.to_string(),
                "--rate",
                &spec.rate.to_string(),
            ])
            .args(["--duration", &spec.duration_s.to_string()]);
        if let Some(cpu) = spec.cpu {
            cmd.args(["--cpu", &cpu.to_string()]);
        }
        if let Some(iface) = &spec.afxdp {
            cmd.args(["--afxdp", iface]);
        }
        // Only when asked for, so the command lines of every other row stay as they were.
        if groups > 1 {
            cmd.args(["--groups", &groups.to_string()]);
        }
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the sender")?;
        Ok(Self {
            child: KillOnDrop(Some(child)),
        })
    }

    pub fn finish(self) -> Result<SendSummary> {
        let out = self.child.wait_with_output()?;
        if !out.status.success() {
            bail!("sender failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).context("sender output")
    }
}

/// `relay-gen` next to the running binary (the test and xtask executables live in
/// target/*/deps or target/*, and cargo builds relay-gen into target/*).
pub fn gen_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RELAY_GEN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the running executable");
    let mut dir = exe.parent().expect("a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("relay-gen")
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}
