//! A `relay` process running in a namespace, killed if the test ends without stopping it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// The relay binary: `$RELAY_BIN`, or the release build in this workspace.
pub fn relay_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RELAY_BIN") {
        // Tests run in their package's folder; a relative path means the caller's.
        return std::fs::canonicalize(&p)
            .unwrap_or_else(|e| panic!("RELAY_BIN={}: {e}", PathBuf::from(&p).display()));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/relay");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask test` (or `cargo xtask build`) so the relay is built with its XDP program",
        p.display()
    );
    p
}

pub struct RelayProc {
    child: Option<Child>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// Its control socket.
    pub control: PathBuf,
    /// The config file it runs on (rewrite it, then reload).
    pub config: PathBuf,
    dir: PathBuf,
}

/// How a relay ended.
pub struct Exit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RelayProc {
    /// Writes `yaml` to a file, starts the relay on it in `ns` with `args`, and waits until it
    /// says it is relaying.
    pub fn start(bin: &Path, ns: &Netns, yaml: &str, args: &[&str]) -> Result<Self> {
        Self::start_wrapped(bin, ns, yaml, args, &[])
    }

    /// As [`RelayProc::start`], with `wrapper` (a command and its arguments, such as
    /// `setpriv ...`) run inside the namespace in front of the relay.
    pub fn start_wrapped(
        bin: &Path,
        ns: &Netns,
        yaml: &str,
        args: &[&str],
        wrapper: &[&str],
    ) -> Result<Self> {
        let dir = std::env::temp_dir().join(crate::netns::unique_name("relay"));
        fs::create_dir_all(&dir)?;
        let config = dir.join("rules.yaml");
        // Each relay gets its own control socket, so relays in different namespaces (which
        // share /run) never meet.
        let control = dir.join("control.sock");
        let yaml = if yaml.contains("control:") {
            yaml.to_owned()
        } else {
            format!("control: {}\n{yaml}", control.display())
        };
        fs::write(&config, yaml)?;
        let stdout = dir.join("stdout");
        let stderr = dir.join("stderr");
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .args(wrapper)
            .arg(bin)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout)?)
            .stderr(fs::File::create(&stderr)?)
            .spawn()
            .context("starting the relay")?;
        let mut proc = RelayProc {
            child: Some(child),
            stdout,
            stderr,
            control,
            config: config.clone(),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = fs::read_to_string(&proc.stderr).unwrap_or_default();
            if log.contains("relaying ") {
                return Ok(proc);
            }
            if let Some(status) = proc.child.as_mut().unwrap().try_wait()? {
                bail!("the relay exited early ({status}):\n{log}");
            }
            if Instant::now() > deadline {
                bail!("the relay did not start within 15 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGTERM and waits (at most `timeout`) for the exit.
    pub fn stop(mut self, timeout: Duration) -> Result<Exit> {
        let mut child = self.child.take().expect("running");
        // `ip netns exec` execs the relay, so the child's pid is the relay's.
        // SAFETY: kill(2) on a pid we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the relay did not exit within {timeout:?} of SIGTERM:\n{}",
                    fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Exit {
            status,
            stdout: fs::read_to_string(&self.stdout)?,
            stderr: fs::read_to_string(&self.stderr)?,
        })
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The value of `key=` on the first line of `report` that contains every one of `filters`.
pub fn report_value(report: &str, filters: &[&str], key: &str) -> Option<u64> {
    let line = report
        .lines()
        .find(|l| filters.iter().all(|f| l.split(' ').any(|w| w == *f)))?;
    line.split(' ')
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}
