//! Developer tasks: `cargo xtask build-ebpf | build | test | demo`.
//!
//! Every task first runs `scripts/setup.sh`, which installs what is missing (apt packages, the
//! pinned nightly with rust-src, bpf-linker) and does nothing when all is there.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "relay's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the XDP program (installs the toolchain it needs the first time).
    BuildEbpf,
    /// Build the XDP program and the relay daemon (release).
    Build,
    /// Run the whole test suite: unit, property and veth-namespace tests (needs root).
    Test {
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build, then relay multicast on a throw-away veth topology and print what happened.
    Demo {
        /// Packets to send per group.
        #[arg(long, default_value_t = 1000)]
        packets: u32,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::BuildEbpf => {
            setup(&root)?;
            build_ebpf(&root)
        }
        Task::Build => {
            setup(&root)?;
            build_ebpf(&root)?;
            build_relay(&root)
        }
        Task::Test { args } => {
            setup(&root)?;
            build_ebpf(&root)?;
            build_relay(&root)?;
            test(&root, &args)
        }
        Task::Demo { packets } => {
            setup(&root)?;
            build_ebpf(&root)?;
            build_relay(&root)?;
            relay_tests::demo::run(&relay_bin(&root), packets)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn relay_bin(root: &Path) -> PathBuf {
    target_dir(root).join("release").join("relay")
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn setup(root: &Path) -> Result<()> {
    // scripts/demo.sh and scripts/test.sh ran it a moment ago.
    if std::env::var_os("RELAY_SETUP_DONE").is_some() {
        return Ok(());
    }
    run(Command::new("bash").arg(root.join("scripts/setup.sh")))
}

/// The pinned nightly that builds the eBPF crate, from relay-ebpf/NIGHTLY.
fn nightly(root: &Path) -> Result<String> {
    let path = root.join("relay-ebpf/NIGHTLY");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

fn build_ebpf(root: &Path) -> Result<()> {
    let nightly = nightly(root)?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("relay-ebpf"))
        // The outer cargo (pinned stable) exports its own toolchain; clear it so `+nightly` wins.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
        )
        .args([
            &format!("+{nightly}"),
            "build",
            "--package",
            "relay-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]);
    run(&mut cmd)?;
    let obj = xdp_object(root);
    if !obj.exists() {
        bail!("the eBPF build finished but {} is missing", obj.display());
    }
    eprintln!("xtask: XDP program at {}", obj.display());
    Ok(())
}

fn xdp_object(root: &Path) -> PathBuf {
    target_dir(root).join("bpfel-unknown-none/release/relay-xdp")
}

fn build_relay(root: &Path) -> Result<()> {
    run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "--package",
        "relay",
        "--bins",
    ]))
}

/// Runs `cargo test` on the workspace, echoing its output, and closes with one line that
/// totals every test binary: `tests: N passed, M failed`.
fn test(root: &Path, args: &[String]) -> Result<()> {
    let mut child = Command::new("cargo")
        .current_dir(root)
        .env("RELAY_BIN", relay_bin(root))
        .args([
            "test",
            "--workspace",
            "--exclude",
            "relay-ebpf",
            "--no-fail-fast",
        ])
        .arg("--")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, "passed");
            failed += count_before(rest, "failed");
        }
    }
    let status = child.wait()?;

    // The lock-free ring's model tests: the crate rebuilt with loom's atomics (its own target
    // dir, so the normal build is left alone) and every interleaving of a few threads explored.
    let mut loom = Command::new("cargo")
        .current_dir(root)
        .env("RUSTFLAGS", "--cfg loom")
        .env("CARGO_TARGET_DIR", target_dir(root).join("loom"))
        .env("RELAY_XDP_OBJ", xdp_object(root))
        .args(["test", "--release", "-p", "relay", "--lib", "pool::ring::loom_tests"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the loom tests")?;
    let loom_out = loom.stdout.take().expect("piped");
    for line in BufReader::new(loom_out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, "passed");
            failed += count_before(rest, "failed");
        }
    }
    let loom_status = loom.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !loom_status.success() {
        bail!("the loom tests failed: {loom_status}");
    }
    if !status.success() || failed > 0 {
        bail!("cargo test failed: {status}");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

/// The number before `word` in a libtest summary such as `ok. 5 passed; 0 failed; ...`.
fn count_before(summary: &str, word: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| part.trim().strip_suffix(word))
        .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
