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

mod check_setup;
mod datapath_bench;
mod package_systemd;
mod pool_bench;

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
    /// Build, then the Debian package (target/debian/relay_*.deb).
    Package,
    /// Build the package, install it in a Debian 12 container booted with systemd
    /// (systemd-nspawn; the root is cached after the first run) and drive relay.service there:
    /// start, reload, on-demand outputs, capture, metrics, journal, stop (needs root). Run
    /// before every release of the package; part of `cargo xtask test`.
    PackageSystemd,
    /// Run the whole test suite: unit, property and veth-namespace tests (needs root).
    Test {
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// A steady flow with a reload every 10 s for N minutes: fails on any lost datagram,
    /// growing memory or a leaked frame (needs root). The result goes into docs/PERFORMANCE.md
    /// unless --no-write.
    Soak {
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// Packets per second of the steady flow (well below the relay's capacity).
        #[arg(long, default_value_t = 50_000)]
        rate: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long)]
        no_write: bool,
    },
    /// Measure the XDP program's cost per frame against the number of rules (kernel test
    /// runs; needs root) and write the table into docs/PERFORMANCE.md.
    BenchXdp {
        #[arg(long)]
        no_write: bool,
    },
    /// Run the frame pool benchmark (criterion) several times and write the median tables into
    /// docs/PERFORMANCE.md (takes a few minutes per run; no root needed).
    BenchPool {
        /// Runs; the tables show the median with the range.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Print the tables without touching docs/PERFORMANCE.md.
        #[arg(long)]
        no_write: bool,
    },
    /// Run scripts/setup.sh with CARGO_HOME and RUSTUP_HOME pointed at empty folders (as CI
    /// systems do) and check that every tool it installs is where cargo looks, and that the
    /// real homes are untouched (downloads the nightly and builds the tools: minutes).
    CheckSetup,
    /// Measure the worker's per-frame path over in-memory sockets (no root), both allocators,
    /// 1 and 2 workers, 1->1 and 1->8, and write the table into docs/PERFORMANCE.md.
    BenchDatapath {
        /// Runs; the table shows the median with the range.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Print the table without touching docs/PERFORMANCE.md.
        #[arg(long)]
        no_write: bool,
    },
    /// Build, then relay multicast on a throw-away veth topology and print what happened.
    Demo {
        /// Packets to send per group.
        #[arg(long, default_value_t = 1000)]
        packets: u32,
    },
    /// Measure the relay against kernel multicast routing and socat on a veth topology, and
    /// write the table into docs/PERFORMANCE.md (takes several minutes; needs root).
    Bench {
        /// Runs per row; the table shows the median.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Seconds of traffic per run.
        #[arg(long, default_value_t = 2.0)]
        duration: f64,
        /// The fixed offered rate, packets per second.
        #[arg(long, default_value_t = 50_000)]
        rate: u64,
        /// UDP payload sizes.
        #[arg(long, value_delimiter = ',', default_values_t = [64usize, 1400])]
        sizes: Vec<usize>,
        /// Only scenarios whose name contains one of these (`=NAME`: exactly that name).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Send with the generator's AF_XDP sender instead of sendmmsg.
        #[arg(long)]
        afxdp_sender: bool,
        /// Print the table without touching docs/PERFORMANCE.md.
        #[arg(long)]
        no_write: bool,
        /// Instead of the scenarios: find the kernel's loss-free 1→1 rate in this run and
        /// offer it to the relay's 1→1 rows (#16 item 5).
        #[arg(long)]
        loss_free: bool,
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
        Task::Package => {
            setup(&root)?;
            build_ebpf(&root)?;
            build_relay(&root)?;
            package(&root)?;
            println!("{}", deb_path(&root)?.display());
            Ok(())
        }
        Task::PackageSystemd => {
            setup(&root)?;
            build_ebpf(&root)?;
            build_relay(&root)?;
            package(&root)?;
            package_systemd::run(&deb_path(&root)?)
        }
        Task::Test { args } => {
            setup(&root)?;
            build_ebpf(&root)?;
            build_relay(&root)?;
            test(&root, &args)
        }
        Task::Bench {
            repeats,
            duration,
            rate,
            sizes,
            only,
            afxdp_sender,
            no_write,
            loss_free,
        } => {
            let gen_bin = build_for_traffic(&root)?;
            let opts = relay_tests::bench::BenchOpts {
                repeats,
                duration,
                rate,
                sizes,
                only,
                afxdp_sender,
            };
            if loss_free {
                let table = relay_tests::bench::loss_free(&relay_bin(&root), &gen_bin, &opts)?;
                return record(&root, "bench-loss-free", &table, no_write);
            }
            let table = relay_tests::bench::run(&relay_bin(&root), &gen_bin, &opts)?;
            record(&root, "bench", &table, no_write)
        }
        Task::Soak {
            minutes,
            rate,
            size,
            no_write,
        } => {
            let gen_bin = build_for_traffic(&root)?;
            let opts = relay_tests::soak::SoakOpts {
                minutes,
                rate,
                size,
            };
            let table = relay_tests::soak::run(&relay_bin(&root), &gen_bin, &opts)?;
            record(&root, "soak", &table, no_write)
        }
        Task::BenchXdp { no_write } => {
            setup(&root)?;
            build_ebpf(&root)?;
            let out = Command::new("cargo")
                .current_dir(&root)
                .args(["bench", "-p", "relay", "--bench", "xdp"])
                .stderr(Stdio::inherit())
                .output()?;
            if !out.status.success() {
                bail!("the XDP benchmark failed: {}", out.status);
            }
            let table = String::from_utf8(out.stdout)?;
            record(&root, "xdp", &table, no_write)
        }
        Task::BenchPool { repeats, no_write } => {
            setup(&root)?;
            build_ebpf(&root)?;
            let tables = pool_bench::run(&root, &target_dir(&root), repeats)?;
            record(&root, "pool", &tables, no_write)
        }
        Task::CheckSetup => check_setup(&root),
        Task::BenchDatapath { repeats, no_write } => {
            let table = datapath_bench::run(&root, &target_dir(&root), repeats)?;
            record(&root, "datapath", &table, no_write)
        }
        Task::Demo { packets } => {
            setup(&root)?;
            build_ebpf(&root)?;
            build_relay(&root)?;
            relay_tests::demo::run(&relay_bin(&root), packets)
        }
    }
}

/// Prints a measured table with when, how and where it was measured, and (unless
/// `no_write`) puts it into docs/PERFORMANCE.md's section `name`.
fn record(root: &Path, name: &str, table: &str, no_write: bool) -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let section = format!(
        "Measured {} with `cargo xtask {}` on {}.\n\n{table}",
        now_utc()?,
        args.join(" "),
        machine()?
    );
    println!("{section}");
    if !no_write {
        write_section(&root.join("docs/PERFORMANCE.md"), name, &section)?;
    }
    Ok(())
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in `path`.
fn write_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let text = std::fs::read_to_string(path)?;
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    let (Some(a), Some(b)) = (text.find(&begin), text.find(&end)) else {
        bail!("{} has no {begin} ... {end} section", path.display());
    };
    let new = format!("{}{begin}\n{body}\n{}", &text[..a], &text[b..]);
    std::fs::write(path, new)?;
    eprintln!("xtask: wrote the table into {}", path.display());
    Ok(())
}

fn now_utc() -> Result<String> {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Kernel, CPU model and count, as the table's caption gives them.
fn machine() -> Result<String> {
    let kernel = Command::new("uname").arg("-r").output()?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(format!(
        "Linux {}, {cpus} × {model}",
        String::from_utf8_lossy(&kernel.stdout).trim()
    ))
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
/// The machine's target triple, as the pinned nightly names it.
fn host_triple(root: &Path) -> Result<String> {
    let out = Command::new("rustc")
        .current_dir(root)
        .env_remove("RUSTUP_TOOLCHAIN")
        .args([&format!("+{}", nightly(root)?), "-vV"])
        .output()?;
    String::from_utf8(out.stdout)?
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV names no host")
}

/// Everything a run with traffic needs: the toolchains, the XDP program, the relay and the
/// generator; returns the generator's path.
fn build_for_traffic(root: &Path) -> Result<PathBuf> {
    setup(root)?;
    build_ebpf(root)?;
    build_relay(root)?;
    build_gen(root)
}

fn check_setup(root: &Path) -> Result<()> {
    check_setup::run(root, &target_dir(root), &stable(root)?, &nightly(root)?)
}

/// Builds the traffic generator; returns its path.
fn build_gen(root: &Path) -> Result<PathBuf> {
    run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "-p",
        "relay-tests",
        "--bin",
        "relay-gen",
        // The bench's floor forwarder, found beside the generator (it needs the relay
        // library, and so the XDP object, hence a feature).
        "--bin",
        "relay-floor",
        "--features",
        "floor",
    ]))?;
    Ok(target_dir(root).join("release/relay-gen"))
}

fn nightly(root: &Path) -> Result<String> {
    let path = root.join("relay-ebpf/NIGHTLY");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

fn build_ebpf(root: &Path) -> Result<()> {
    let mut cmd = Command::new("cargo");
    configure_ebpf_build(&mut cmd, root, &nightly(root)?);
    run(&mut cmd)?;
    let obj = xdp_object(root);
    if !obj.exists() {
        bail!("the eBPF build finished but {} is missing", obj.display());
    }
    build_vlan_hint(root, &obj.with_file_name(VLAN_HINT_OBJECT))?;
    eprintln!("xtask: XDP program at {}", obj.display());
    Ok(())
}

/// The front program for NICs that hand the VLAN tag over as XDP metadata, beside the XDP
/// object: relay/build.rs finds it there. In C: see the file's head for why.
const VLAN_HINT_OBJECT: &str = "relay-vlan-hint.o";

fn build_vlan_hint(root: &Path, out: &Path) -> Result<()> {
    // <linux/bpf.h> includes <asm/types.h>, which Debian keeps under the multiarch folder;
    // -target bpf does not look there by itself.
    let multiarch = Command::new("clang")
        .arg("-print-multiarch")
        .output()
        .context("running clang (scripts/setup.sh installs it)")?;
    let multiarch = String::from_utf8_lossy(&multiarch.stdout).trim().to_owned();
    run(Command::new("clang")
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg(root.join("relay-ebpf/src/vlan_hint.bpf.c"))
        .arg("-o")
        .arg(out))
}

/// Makes `cmd` (a `cargo`) build the eBPF crate with the pinned nightly.
fn configure_ebpf_build(cmd: &mut Command, root: &Path, nightly: &str) {
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
}

/// The pinned stable, from rust-toolchain.toml.
fn stable(root: &Path) -> Result<String> {
    let path = root.join("rust-toolchain.toml");
    std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .lines()
        .find_map(|l| {
            let v = l.strip_prefix("channel")?.trim_start().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_owned())
        })
        .with_context(|| format!("{} names no channel", path.display()))
}

/// Builds the Debian package from the release build.
fn package(root: &Path) -> Result<()> {
    run(Command::new("cargo")
        .current_dir(root)
        .args(["deb", "-p", "relay", "--no-build"]))
}

fn deb_path(root: &Path) -> Result<PathBuf> {
    let dir = target_dir(root).join("debian");
    std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .ok_or_else(|| anyhow::anyhow!("no .deb in {}", dir.display()))
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

/// On CI, where the clone is thrown away afterwards, a stage's own target dir goes as soon as
/// the stage is done: the machine's disk is shared and the sanitizer, loom and fuzz builds
/// together would otherwise take about 6 GB more at the peak.
fn drop_in_ci(dir: &Path) {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty())
        && dir.exists()
        && let Err(e) = std::fs::remove_dir_all(dir)
    {
        eprintln!("xtask: removing {}: {e}", dir.display());
    }
}

/// Free space where the builds go, printed first: when a run dies of a full disk, its log
/// says how much there was.
fn report_free_space(root: &Path) {
    let target = target_dir(root);
    let place = if target.exists() {
        target
    } else {
        root.to_path_buf()
    };
    match Command::new("df")
        .args(["-h", "--output=avail"])
        .arg(&place)
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let avail = text.lines().nth(1).unwrap_or("?").trim();
            println!("xtask: {avail} free on the disk of {}", place.display());
        }
        _ => println!(
            "xtask: df could not tell the free space of {}",
            place.display()
        ),
    }
}

/// Runs every suite: the workspace's tests, the lock-free ring's loom models, and the pool's
/// unit tests under Miri; closes with one line that totals them: `tests: N passed, M failed`.
/// Seconds each fuzz target runs in the test suite.
const FUZZ_SECONDS: u32 = 20;

fn test(root: &Path, args: &[String]) -> Result<()> {
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    report_free_space(root);

    package(root)?;
    let mut workspace = Command::new("cargo");
    workspace
        .current_dir(root)
        .env("RELAY_BIN", relay_bin(root))
        .env("RELAY_DEB", deb_path(root)?)
        .args([
            "test",
            "--workspace",
            "--exclude",
            "relay-ebpf",
            "--no-fail-fast",
        ])
        .arg("--")
        .args(args);
    tally.run("cargo test", &mut workspace, &mut failures)?;

    // The crate rebuilt with loom's atomics (in its own target dir, so the normal build is
    // left alone), and every interleaving of a few threads explored.
    let mut loom = Command::new("cargo");
    loom.current_dir(root)
        .env("RUSTFLAGS", "--cfg loom")
        .env("CARGO_TARGET_DIR", target_dir(root).join("loom"))
        .env("RELAY_XDP_OBJ", xdp_object(root))
        .args([
            "test",
            "--release",
            "-p",
            "relay",
            "--lib",
            "pool::ring::loom_tests",
        ]);
    tally.run("loom", &mut loom, &mut failures)?;
    drop_in_ci(&target_dir(root).join("loom"));

    // Miri checks the ring's cell accesses and the cache for undefined behaviour; the
    // multi-million-frame stress test is left to the native run.
    let mut miri = Command::new("cargo");
    miri.current_dir(root)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("RELAY_XDP_OBJ", xdp_object(root))
        .args([
            &format!("+{}", nightly(root)?),
            "miri",
            "test",
            "-p",
            "relay",
            "--lib",
        ])
        .args(["pool::", "--", "--skip", "stress"]);
    tally.run("miri", &mut miri, &mut failures)?;
    drop_in_ci(&target_dir(root).join("miri"));

    // ThreadSanitizer on the pool's tests, the cross-thread and stress ones included: std is
    // rebuilt with the sanitizer (rust-src), in its own target dir.
    let mut tsan = Command::new("cargo");
    tsan.current_dir(root)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("RUSTFLAGS", "-Zsanitizer=thread")
        .env("CARGO_TARGET_DIR", target_dir(root).join("tsan"))
        .env("RELAY_XDP_OBJ", xdp_object(root))
        .args([
            &format!("+{}", nightly(root)?),
            "test",
            "-Zbuild-std",
            "--target",
            &host_triple(root)?,
            "-p",
            "relay",
            "--lib",
            "pool::",
        ]);
    tally.run("tsan", &mut tsan, &mut failures)?;
    drop_in_ci(&target_dir(root).join("tsan"));

    // The fuzz targets, from the committed corpus, for a bounded time each: a crash fails the
    // run and leaves the input in fuzz/artifacts/. libFuzzer writes what it finds into the
    // first corpus directory, so that is a scratch one: a test run leaves the committed
    // corpus as it was.
    for target in ["frame", "config", "listeners"] {
        let scratch =
            std::env::temp_dir().join(format!("relay-fuzz-{target}-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;
        let mut fuzz = Command::new("cargo");
        fuzz.current_dir(root.join("fuzz"))
            .env_remove("RUSTUP_TOOLCHAIN")
            .env("RELAY_XDP_OBJ", xdp_object(root))
            .args([&format!("+{}", nightly(root)?), "fuzz", "run", target])
            .arg(&scratch)
            .arg(root.join("fuzz/corpus").join(target))
            .args(["--", &format!("-max_total_time={FUZZ_SECONDS}")]);
        let result = tally.check(&format!("fuzz {target}"), &mut fuzz, &mut failures);
        let _ = std::fs::remove_dir_all(&scratch);
        result?;
    }
    drop_in_ci(&root.join("fuzz/target"));

    // Setup from empty CARGO_HOME and RUSTUP_HOME, as a CI system runs it.
    tally.outcome("check-setup", check_setup(root), &mut failures);

    // The soak, for one minute: a steady flow through periodic reloads loses nothing, leaks
    // nothing and holds its memory (`cargo xtask soak` runs it longer).
    let gen_bin = build_gen(root)?;
    let soak = relay_tests::soak::run(
        &relay_bin(root),
        &gen_bin,
        &relay_tests::soak::SoakOpts {
            minutes: 1.0,
            rate: 50_000,
            size: 64,
        },
    );
    match soak {
        Ok(table) => {
            println!("soak (1 minute):\n{table}");
            tally.passed += 1;
        }
        Err(e) => {
            println!("soak (1 minute): {e:#}");
            tally.failed += 1;
            failures.push("soak".to_owned());
        }
    }

    // The package as users run it: installed in a container booted with systemd, driven by
    // systemctl (about 15 s once the Debian root is cached; the first run builds it: 2 to 3
    // minutes).
    let deb = deb_path(root)?;
    tally.outcome("package-systemd", package_systemd::run(&deb), &mut failures);

    println!("tests: {} passed, {} failed", tally.passed, tally.failed);
    if !failures.is_empty() || tally.failed > 0 {
        bail!("failed: {}", failures.join(", "));
    }
    if tally.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    /// Runs a command that is one check, passed if it exits 0.
    fn check(&mut self, name: &str, cmd: &mut Command, failures: &mut Vec<String>) -> Result<()> {
        let status = cmd.status().with_context(|| format!("starting {name}"))?;
        if status.success() {
            self.passed += 1;
        } else {
            self.failed += 1;
            failures.push(format!("{name} ({status})"));
        }
        Ok(())
    }

    /// Counts a check that ran in this process: passed if it returned Ok.
    fn outcome(&mut self, name: &str, result: Result<()>, failures: &mut Vec<String>) {
        match result {
            Ok(()) => self.passed += 1,
            Err(e) => {
                println!("{name}: {e:#}");
                self.failed += 1;
                failures.push(name.to_owned());
            }
        }
    }

    /// Runs a libtest command, echoing its output and adding up its summaries.
    fn run(&mut self, name: &str, cmd: &mut Command, failures: &mut Vec<String>) -> Result<()> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().expect("piped");
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                self.passed += count_before(rest, "passed");
                self.failed += count_before(rest, "failed");
            }
        }
        let status = child.wait()?;
        if !status.success() {
            failures.push(format!("{name} ({status})"));
        }
        Ok(())
    }
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
