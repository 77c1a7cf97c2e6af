//! `cargo xtask package-systemd`: the Debian package run as users run it, by systemd. A
//! Debian 12 root (debootstrap, cached: it takes minutes) is booted with systemd as PID 1 in
//! `systemd-nspawn --boot --ephemeral --private-network`; package_systemd.sh then installs the
//! .deb inside it and drives relay.service through systemctl (start, reload good and broken,
//! on-demand outputs, capture, metrics, journal, stop), with its traffic between namespaces
//! it makes inside the container. Needs root.
//!
//! What it leaves behind: the cached root only. The container is ephemeral (nspawn works on a
//! copy and removes it when the container exits) and owns its network namespace, so its veths,
//! namespaces and XDP programs go with it; the guard below stops it on every way out.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The scenario run inside the container.
const SCENARIO: &str = include_str!("package_systemd.sh");
/// What the root holds besides debootstrap's minbase: systemd to boot, the package's
/// dependencies (the container has no network, so `dpkg -i` finds them installed), and the
/// tools the scenario uses.
const INCLUDE: &str = "systemd,systemd-sysv,dbus,libelf1,zlib1g,iproute2,socat,curl,procps";
const SUITE: &str = "bookworm";
/// Seconds for the container to reach `running` (or `degraded`), and for the scenario.
const BOOT_SECONDS: u32 = 90;
const SCENARIO_SECONDS: u32 = 300;

/// Builds the root once (or when [`INCLUDE`] changes), boots it, runs the scenario.
pub fn run(deb: &Path) -> Result<()> {
    let started = Instant::now();
    for tool in ["systemd-nspawn", "debootstrap", "nsenter"] {
        if !on_path(tool) {
            bail!(
                "{tool} is not installed: run scripts/setup.sh (it installs systemd-container and debootstrap)"
            );
        }
    }
    let root = rootfs(&cache_dir()?)?;
    let staging = Staging::new(deb)?;
    let container = Container::boot(&root, &staging.dir)?;
    println!(
        "package-systemd: {} booted in {:.0} s",
        container.name,
        started.elapsed().as_secs_f64()
    );
    let status = Command::new("timeout")
        .arg(SCENARIO_SECONDS.to_string())
        .args(container.nsenter())
        .args(["/bin/bash", "/mnt/relay/package_systemd.sh"])
        .status()
        .context("starting the scenario with nsenter")?;
    drop(container);
    println!(
        "package-systemd: {:.0} s in all",
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("the package under systemd failed ({status}): see the FAIL line above");
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// `RELAY_ROOTFS_CACHE`, else `$XDG_CACHE_HOME/relay`, else `~/.cache/relay`: outside
/// target/, so `cargo clean` keeps the minutes debootstrap took.
fn cache_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("RELAY_ROOTFS_CACHE") {
        return Ok(PathBuf::from(d));
    }
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is unset")?).join(".cache"),
    };
    Ok(base.join("relay").join("package-systemd"))
}

/// The cached root, made by debootstrap the first time. Built in a scratch folder and renamed
/// into place, so an interrupted build is never taken for a finished one.
fn rootfs(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join(SUITE);
    let stamp = dir.join("etc/relay-package-systemd-include");
    if fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == INCLUDE) {
        return Ok(dir);
    }
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let scratch = cache.join(format!("{SUITE}.partial-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(scratch.clone());
    let mirror = mirror()?;
    println!(
        "package-systemd: building the Debian {SUITE} root in {} from {mirror} (once; a few minutes)",
        dir.display()
    );
    let status = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
        .arg(&scratch)
        .arg(&mirror)
        .status()
        .context("starting debootstrap")?;
    if !status.success() {
        bail!("debootstrap {SUITE} from {mirror} failed: {status}");
    }
    fs::write(scratch.join("etc/relay-package-systemd-include"), INCLUDE)?;
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing the old {}", dir.display()))?;
    }
    fs::rename(&scratch, &dir)?;
    Ok(dir)
}

/// The Debian mirror apt uses here (`RELAY_DEBIAN_MIRROR` overrides): the first source, in
/// one-line or deb822 form, that serves the suite's `main`.
fn mirror() -> Result<String> {
    if let Ok(m) = std::env::var("RELAY_DEBIAN_MIRROR") {
        return Ok(m);
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<_> = dir.filter_map(Result::ok).map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in &files {
        let Ok(text) = fs::read_to_string(f) else {
            continue;
        };
        if let Some(m) = mirror_in(&text) {
            return Ok(m);
        }
    }
    bail!(
        "no apt source for Debian {SUITE} main in /etc/apt/sources.list*: set RELAY_DEBIAN_MIRROR"
    )
}

fn mirror_in(text: &str) -> Option<String> {
    // One-line: `deb [options] URI SUITE COMPONENT...`.
    for line in text.lines() {
        let words: Vec<&str> = line
            .split_whitespace()
            .filter(|w| !w.starts_with('['))
            .collect();
        if let ["deb", uri, suite, components @ ..] = words.as_slice()
            && *suite == SUITE
            && components.contains(&"main")
        {
            return Some((*uri).to_owned());
        }
    }
    // deb822: stanzas of `Key: value` separated by blank lines.
    for stanza in text.split("\n\n") {
        let field = |key: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim().eq_ignore_ascii_case(key)).then(|| v.trim().to_owned())
            })
        };
        let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else {
            continue;
        };
        let components = field("Components").unwrap_or_default();
        if suites.split_whitespace().any(|s| s == SUITE)
            && components.split_whitespace().any(|c| c == "main")
        {
            return uris.split_whitespace().next().map(str::to_owned);
        }
    }
    None
}

/// A folder bound read-only into the container: the .deb and the scenario.
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn new(deb: &Path) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("relay-package-systemd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let staging = Staging { dir };
        fs::copy(deb, staging.dir.join("relay.deb"))
            .with_context(|| format!("copying {}", deb.display()))?;
        fs::write(staging.dir.join("package_systemd.sh"), SCENARIO)?;
        Ok(staging)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A booted container; dropping it powers it off (SIGTERM to nspawn: the container's systemd
/// shuts down), or kills nspawn when that takes too long.
struct Container {
    nspawn: Child,
    name: String,
    leader: u32,
    log: PathBuf,
}

impl Container {
    fn boot(root: &Path, staging: &Path) -> Result<Self> {
        let name = format!("relay-pkg-{}", std::process::id());
        let log = std::env::temp_dir().join(format!("{name}.console"));
        let console = fs::File::create(&log)?;
        let nspawn = Command::new("systemd-nspawn")
            .args(["--quiet", "--boot", "--ephemeral", "--directory"])
            .arg(root)
            .args(["--machine", &name])
            // Its own network namespace: the veths, namespaces and traffic stay inside.
            .arg("--private-network")
            // No machined or system bus on the host (PID 1 there need not be systemd).
            .args(["--register=no", "--keep-unit", "--console=passive"])
            // What relay.service grants, on top of nspawn's default set (which has
            // CAP_NET_ADMIN with --private-network, and CAP_NET_RAW); and the syscalls
            // nspawn's filter leaves out that loading XDP programs needs.
            .arg("--capability=CAP_BPF,CAP_PERFMON,CAP_IPC_LOCK")
            .arg("--system-call-filter=bpf perf_event_open")
            .arg(format!("--bind-ro={}:/mnt/relay", staging.display()))
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .spawn()
            .context("starting systemd-nspawn")?;
        let mut c = Container {
            nspawn,
            name,
            leader: 0,
            log,
        };
        c.leader = c.wait_for_leader()?;
        // `offline` (or no answer) until systemd has its bus up: asked again until the
        // boot's deadline.
        let deadline = Instant::now() + Duration::from_secs(BOOT_SECONDS.into());
        let (state, said) = loop {
            let out = Command::new("timeout")
                .arg(BOOT_SECONDS.to_string())
                .args(c.nsenter())
                .args(["systemctl", "is-system-running", "--wait"])
                .output()
                .context("asking the container's systemd")?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if matches!(state.as_str(), "running" | "degraded") || Instant::now() > deadline {
                break (
                    state,
                    String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                );
            }
            thread::sleep(Duration::from_millis(500));
        };
        match state.as_str() {
            "running" => {}
            "degraded" => {
                // Not the relay's doing (it is not installed yet); shown, not fatal.
                let _ = Command::new("nsenter")
                    .args(c.nsenter_args())
                    .args(["systemctl", "--failed", "--no-pager"])
                    .status();
            }
            _ => bail!(
                "the container did not boot (systemd says '{state}' {said}); console:\n{}",
                c.console()
            ),
        }
        Ok(c)
    }

    /// The container's PID 1, seen from here: nspawn's child.
    fn wait_for_leader(&mut self) -> Result<u32> {
        let parent = self.nspawn.id();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.nspawn.try_wait()? {
                bail!(
                    "systemd-nspawn exited ({status}) before booting:\n{}",
                    self.console()
                );
            }
            if let Some(pid) = child_of(parent) {
                return Ok(pid);
            }
            thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "systemd-nspawn started no container in 60 s:\n{}",
            self.console()
        )
    }

    fn nsenter_args(&self) -> Vec<String> {
        vec!["-t".into(), self.leader.to_string(), "-a".into()]
    }

    /// `nsenter -t LEADER -a`: a command run after it runs in the container.
    fn nsenter(&self) -> Vec<String> {
        let mut v = vec!["nsenter".to_owned()];
        v.extend(self.nsenter_args());
        v
    }

    fn console(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // The nspawn we spawned and have not reaped, so the pid is still ours.
        let _ = Command::new("kill")
            .args(["-TERM", &self.nspawn.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                let _ = fs::remove_file(&self.log);
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "package-systemd: {} did not power off in 30 s; killing systemd-nspawn",
            self.name
        );
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The container's init: a child of `parent` (from /proc/*/stat) that runs systemd. nspawn's
/// other children (the one that sets the container up) come and go before it.
fn child_of(parent: u32) -> Option<u32> {
    fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            // The command name is in parentheses and may hold spaces: the fields after it.
            let after = &stat[stat.rfind(')')? + 2..];
            let ppid: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
            let comm = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?;
            (ppid == parent && comm == "systemd").then_some(pid)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The families the unit allows (`RestrictAddressFamilies=`).
    fn unit_families(unit: &str) -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix("RestrictAddressFamilies="))
            .flat_map(|v| v.split_whitespace().map(str::to_owned))
            .collect()
    }

    /// The families the relay's sources pass to socket(2) themselves: `libc::AF_*` within the
    /// few lines after each `libc::socket(`.
    fn families_opened(src: &str) -> Vec<String> {
        let lines: Vec<&str> = src.lines().collect();
        let mut found = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            if !l.contains("libc::socket(") {
                continue;
            }
            for near in &lines[i..(i + 4).min(lines.len())] {
                for (at, _) in near.match_indices("libc::AF_") {
                    let name: String = near[at + "libc::".len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    found.push(name);
                }
            }
        }
        found
    }

    /// The systemd run (`cargo xtask package-systemd`) is the proof; this is the quick guard
    /// without root: a socket family that a change opens with socket(2) directly, or that the
    /// crates open (netlink, AF_XDP, the control and metrics listeners), is in the unit.
    #[test]
    fn the_unit_allows_every_family_the_relay_opens() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let unit = fs::read_to_string(root.join("packaging/relay.service")).unwrap();
        let allowed = unit_families(&unit);
        let mut needed: Vec<String> = ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_XDP"]
            .map(str::to_owned)
            .to_vec();
        for entry in walkdir::WalkDir::new(root.join("relay/src")) {
            let entry = entry.unwrap();
            if entry.path().extension().is_some_and(|e| e == "rs") {
                needed.extend(families_opened(&fs::read_to_string(entry.path()).unwrap()));
            }
        }
        assert!(
            needed.iter().any(|f| f == "AF_PACKET"),
            "the querier's packet socket was not found: the scan is blind"
        );
        for f in &needed {
            assert!(
                allowed.contains(f),
                "packaging/relay.service: RestrictAddressFamilies= lacks {f}, which the relay opens ({allowed:?})"
            );
        }
    }

    #[test]
    fn finds_the_mirror_in_both_source_formats() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n\nTypes: deb\n# a comment\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n";
        assert_eq!(
            mirror_in(deb822).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let one_line = "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\ndeb [arch=amd64] http://mirror.example/debian bookworm main contrib\n";
        assert_eq!(
            mirror_in(one_line).as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(mirror_in("deb http://x/debian bookworm contrib\n"), None);
    }
}
