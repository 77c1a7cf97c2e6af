//! `cargo xtask check-setup`: scripts/setup.sh run as on a fresh CI machine, with CARGO_HOME and
//! RUSTUP_HOME pointed at empty folders (apart from rustup itself and the pinned stable), then
//! every tool it installs looked for where cargo and rustup look in those homes, and the
//! user's own homes checked untouched.
//!
//! It downloads the nightly and builds bpf-linker, cargo-deb and cargo-fuzz from source, so it
//! takes minutes. Its folders live under the target dir, are removed when it ends however it
//! ends, and a run that was killed has its leftovers removed by the next.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Instant, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};

/// The versions scripts/setup.sh pins, read from it so the two cannot disagree.
struct Pins {
    bpf_linker: String,
    cargo_deb: String,
    cargo_fuzz: String,
}

fn pins(root: &Path) -> Result<Pins> {
    let script = std::fs::read_to_string(root.join("scripts/setup.sh"))?;
    let pin = |key: &str| -> Result<String> {
        script
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("scripts/setup.sh sets no {key}"))
    };
    Ok(Pins {
        bpf_linker: pin("BPF_LINKER_VERSION")?,
        cargo_deb: pin("CARGO_DEB_VERSION")?,
        cargo_fuzz: pin("CARGO_FUZZ_VERSION")?,
    })
}

/// The check's folder: emptied when made and removed when dropped, on every way out.
struct Scratch(PathBuf);

impl Scratch {
    fn new(path: PathBuf) -> Result<Scratch> {
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing the leftovers in {}", path.display()))?;
        }
        std::fs::create_dir_all(&path)?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("check-setup: removing {}: {e}", self.0.display());
        }
    }
}

/// Path, size and modification time of everything under a folder, to see what a run wrote.
/// Folders count by their entries only: their times change with the shared caches' lock and
/// journal files that come and go beside them.
type Listing = BTreeMap<PathBuf, Option<(u64, Option<SystemTime>)>>;

/// Cargo's shared caches (by name prefix: their lock and journal files too), which any cargo
/// on the machine (other builds running meanwhile) writes to. The fresh home's own registry
/// proves setup's downloads went there instead.
const SHARED_CACHES: &[&str] = &["registry", "git", ".global-cache", ".package-cache"];

fn listing(dir: &Path) -> Listing {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_entry(|e| {
            e.depth() != 1
                || !SHARED_CACHES
                    .iter()
                    .any(|c| e.file_name().to_string_lossy().starts_with(c))
        })
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = e.path().symlink_metadata().ok()?;
            let stamp = (!m.is_dir()).then(|| (m.len(), m.modified().ok()));
            Some((e.path().to_path_buf(), stamp))
        })
        .collect()
}

fn changes(before: &Listing, after: &Listing) -> Vec<String> {
    let mut out = Vec::new();
    for (path, was) in before {
        match after.get(path) {
            None => out.push(format!("removed {}", path.display())),
            Some(now) if now != was => out.push(format!("changed {}", path.display())),
            Some(_) => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        out.push(format!("added {}", path.display()));
    }
    out
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    ensure!(
        status.success(),
        "cp -a {} {}: {status}",
        from.display(),
        to.display()
    );
    Ok(())
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn run(root: &Path, target: &Path, stable: &str, nightly: &str) -> Result<()> {
    let started = Instant::now();
    let home = PathBuf::from(std::env::var_os("HOME").context("HOME is unset")?);
    let env_dir = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(default))
    };
    let (real_cargo, real_rustup) = (
        env_dir("CARGO_HOME", ".cargo"),
        env_dir("RUSTUP_HOME", ".rustup"),
    );
    let pins = pins(root)?;

    let scratch = Scratch::new(target.join("setup-check"))?;
    let cargo_home = scratch.0.join("cargo");
    let rustup_home = scratch.0.join("rustup");
    let bin = cargo_home.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(rustup_home.join("toolchains"))?;

    // rustup as its installer leaves it: the binary, and the proxies (cargo, rustc, ...) as
    // links to it, in CARGO_HOME/bin.
    std::fs::copy(real_cargo.join("bin/rustup"), bin.join("rustup"))
        .context("copying rustup from CARGO_HOME/bin")?;
    for entry in std::fs::read_dir(real_cargo.join("bin"))? {
        let entry = entry?;
        if std::fs::read_link(entry.path()).is_ok_and(|t| t == Path::new("rustup")) {
            std::os::unix::fs::symlink("rustup", bin.join(entry.file_name()))?;
        }
    }
    // Only the pinned stable, the default, as the image provides it.
    let host = host_of(&real_rustup, stable)?;
    let toolchain = format!("{stable}-{host}");
    copy(
        &real_rustup.join("toolchains").join(&toolchain),
        &rustup_home.join("toolchains"),
    )?;
    std::fs::write(
        rustup_home.join("settings.toml"),
        format!(
            "version = \"12\"\ndefault_toolchain = \"{toolchain}\"\nprofile = \"minimal\"\n\
             auto_self_update = \"disable\"\n\n[overrides]\n"
        ),
    )?;
    // Crate sources (not binaries) from the real registry, to save downloading them again:
    // cargo checks each against its checksum all the same, and builds everything from scratch.
    std::fs::create_dir_all(cargo_home.join("registry"))?;
    for part in ["cache", "index"] {
        let from = real_cargo.join("registry").join(part);
        if from.exists() {
            copy(&from, &cargo_home.join("registry"))?;
        }
    }

    let watched: Vec<PathBuf> = {
        let mut v = vec![
            real_cargo.clone(),
            real_rustup.clone(),
            home.join(".cargo"),
            home.join(".rustup"),
            home.join(".cache/relay"),
        ];
        v.sort();
        v.dedup();
        v
    };
    let before: Vec<Listing> = watched.iter().map(|d| listing(d)).collect();

    // A new user's environment: nothing from the outer cargo (RUSTUP_TOOLCHAIN, CARGO_*), no
    // PATH entry for the real CARGO_HOME/bin (whose tools would hide missing ones).
    let path = format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        bin.display()
    );
    let fresh = |program: &str| {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .current_dir(root)
            .env("HOME", &home)
            .env("PATH", &path)
            .env("CARGO_HOME", &cargo_home)
            .env("RUSTUP_HOME", &rustup_home)
            .env("RUSTUP_AUTO_INSTALL", "0");
        for keep in ["USER", "LANG", "TERM"] {
            if let Some(v) = std::env::var_os(keep) {
                cmd.env(keep, v);
            }
        }
        cmd
    };
    let output = |cmd: &mut Command| -> Result<String> {
        let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
        ensure!(
            out.status.success(),
            "{cmd:?}: {}\n{}",
            out.status,
            text(&out)
        );
        Ok(text(&out))
    };

    let t = Instant::now();
    let status = fresh("bash").arg("scripts/setup.sh").status()?;
    ensure!(
        status.success(),
        "scripts/setup.sh in fresh homes: {status}"
    );
    eprintln!(
        "check-setup: setup.sh from empty homes took {:.0} s",
        t.elapsed().as_secs_f64()
    );

    // Each tool, found the way the builds find it.
    let found = fresh("bpf-linker").arg("--version").output()?;
    ensure!(
        found.status.success() && text(&found).contains(&pins.bpf_linker),
        "bpf-linker --version with {} on PATH: {}",
        bin.display(),
        text(&found)
    );
    ensure!(
        bin.join("bpf-linker").exists(),
        "bpf-linker is not in {}",
        bin.display()
    );
    // It loads the nightly's libLLVM of these homes, not the real ones'.
    let ldd = output(fresh("ldd").arg(bin.join("bpf-linker")))?;
    let llvm = ldd
        .lines()
        .find(|l| l.contains("libLLVM"))
        .and_then(|l| l.split("=> ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .with_context(|| format!("ldd bpf-linker names no libLLVM:\n{ldd}"))?;
    let llvm = std::fs::canonicalize(llvm)?;
    ensure!(
        llvm.starts_with(
            rustup_home
                .join("toolchains")
                .join(format!("{nightly}-{host}"))
        ),
        "bpf-linker loads {}, not the fresh nightly's libLLVM",
        llvm.display()
    );
    let miri = output(fresh("cargo").args([&format!("+{nightly}"), "miri", "--version"]))?;
    ensure!(miri.contains("miri"), "cargo miri --version: {miri}");
    // As `cargo xtask test` runs them: cargo-deb under the pinned stable (rust-toolchain.toml),
    // cargo-fuzz under the nightly.
    let with_nightly = format!("+{nightly}");
    for (toolchain, tool, version) in [
        (None, "deb", &pins.cargo_deb),
        (Some(with_nightly.as_str()), "fuzz", &pins.cargo_fuzz),
    ] {
        let out = output(fresh("cargo").args(toolchain).args([tool, "--version"]))?;
        ensure!(
            out.contains(version.as_str()),
            "cargo {tool} --version: {out}"
        );
        ensure!(
            bin.join(format!("cargo-{tool}")).exists(),
            "cargo-{tool} is not in {}",
            bin.display()
        );
    }
    let src = rustup_home
        .join("toolchains")
        .join(format!("{nightly}-{host}"))
        .join("lib/rustlib/src/rust/library/core");
    ensure!(
        src.is_dir(),
        "the nightly's rust-src is missing: no {}",
        src.display()
    );
    let downloaded = cargo_home
        .join("registry/src")
        .read_dir()
        .context("nothing was unpacked into the fresh registry")?
        .filter_map(Result::ok)
        .any(|d| {
            d.path()
                .join(format!("bpf-linker-{}", pins.bpf_linker))
                .is_dir()
        });
    ensure!(
        downloaded,
        "bpf-linker's source is not in the fresh registry"
    );

    // The XDP program built as `cargo xtask build-ebpf` builds it: the nightly's rustc finds
    // bpf-linker through rustup's PATH and builds core from rust-src.
    let t = Instant::now();
    let ebpf_target = scratch.0.join("target");
    let mut build = fresh("cargo");
    crate::configure_ebpf_build(&mut build, root, nightly);
    build.env("CARGO_TARGET_DIR", &ebpf_target);
    output(&mut build)?;
    let obj = ebpf_target.join("bpfel-unknown-none/release/relay-xdp");
    ensure!(obj.exists(), "the XDP build left no {}", obj.display());
    eprintln!(
        "check-setup: the XDP program built in {:.0} s",
        t.elapsed().as_secs_f64()
    );

    // A second run finds everything and installs nothing.
    let again = output(fresh("bash").arg("scripts/setup.sh"))?;
    ensure!(
        !again.contains("installing") && !again.contains("building"),
        "a second setup.sh run installed again:\n{again}"
    );

    let after: Vec<Listing> = watched.iter().map(|d| listing(d)).collect();
    let touched: Vec<String> = before
        .iter()
        .zip(&after)
        .flat_map(|(b, a)| changes(b, a))
        .collect();
    if !touched.is_empty() {
        bail!(
            "setup with CARGO_HOME={} RUSTUP_HOME={} wrote to the real homes:\n{}",
            cargo_home.display(),
            rustup_home.display(),
            touched.join("\n")
        );
    }
    eprintln!(
        "check-setup: passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The host triple, as the pinned stable in the real RUSTUP_HOME names it.
fn host_of(rustup_home: &Path, stable: &str) -> Result<String> {
    let out = Command::new("rustc")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("RUSTUP_HOME", rustup_home)
        .args([&format!("+{stable}"), "-vV"])
        .output()?;
    String::from_utf8(out.stdout)?
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV names no host")
}
