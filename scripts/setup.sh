#!/usr/bin/env bash
# Installs everything relay needs to build and test on a fresh Debian 12 machine, and nothing
# that is already there. Safe to run again; each step checks before it acts.
#
# Why a shell script: the repository pins its toolchains (rust-toolchain.toml) and rustup runs
# with RUSTUP_AUTO_INSTALL=0, so no `cargo` command works in this tree until the pinned stable
# exists. Everything after this script is `cargo xtask ...`.
set -euo pipefail

cd "$(dirname "$0")/.."

STABLE=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
NIGHTLY=$(cat relay-ebpf/NIGHTLY)
BPF_LINKER_VERSION=0.13.0
# Where rustup and cargo keep toolchains and installed tools: the same defaults they use, so a
# machine (or CI job) that points CARGO_HOME/RUSTUP_HOME elsewhere gets everything there and
# nothing in $HOME. rustup puts $CARGO_HOME/bin first on the PATH of every cargo and rustc it
# runs, so that is where the tools below must be for the builds to find them.
export CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
export RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}"

say() { printf '\033[1msetup:\033[0m %s\n' "$*" >&2; }

# --- apt packages -------------------------------------------------------------------------
# libxdp-sys (under xsk-rs) compiles libxdp/libbpf from source with clang, m4, libelf and zlib.
# iproute2/ethtool/tcpdump/bpftool are used by the namespace harness and by operators.
# debootstrap/systemd-container: `cargo xtask package-systemd` boots the package in a Debian
# container with systemd as PID 1.
APT_PKGS=(pkg-config libelf-dev zlib1g-dev clang m4 llvm libbpf-dev iproute2 ethtool tcpdump
  bpftool smcroute socat iputils-ping procps debootstrap systemd-container)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# Only apt needs root: the toolchains and tools go to this user's homes.
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ${#missing[@]} -gt 0 ]; then
  say "installing apt packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

# --- toolchains -----------------------------------------------------------------------------
if ! rustup toolchain list | grep -q "^$STABLE-"; then
  say "installing Rust $STABLE (pinned in rust-toolchain.toml)"
  rustup toolchain install "$STABLE" --profile minimal -c clippy,rustfmt
fi
# rust-src: the eBPF crate builds core from source. miri: the test suite runs the frame pool's
# unit tests under it.
if ! rustup toolchain list | grep -q "^$NIGHTLY-"; then
  say "installing $NIGHTLY with rust-src and miri"
  rustup toolchain install "$NIGHTLY" --profile minimal -c rust-src -c miri
fi
for c in rust-src miri; do
  if ! rustup component list --toolchain "$NIGHTLY" --installed | grep -q "^$c"; then
    rustup component add "$c" --toolchain "$NIGHTLY"
  fi
done

# --- bpf-linker -----------------------------------------------------------------------------
# Built against the pinned nightly's own libLLVM, so the bitcode rustc emits and the LLVM that
# links it always agree. The stamp records which libLLVM it was built for.
sysroot=$(rustc +"$NIGHTLY" --print sysroot)
libllvm=$(find "$sysroot/lib" -maxdepth 1 -name 'libLLVM.so.*' | head -n1)
[ -n "$libllvm" ] || { echo "setup: no libLLVM.so.* in $sysroot/lib" >&2; exit 1; }
llvm_major=$(basename "$libllvm" | sed 's/^libLLVM\.so\.\([0-9]*\).*/\1/')
stamp="$CARGO_HOME/bin/.bpf-linker-for"
# The full path of the libLLVM, not only its name: the binary loads it through the symlinks
# below, so the same CARGO_HOME used with another RUSTUP_HOME needs them pointed anew.
want="$BPF_LINKER_VERSION $libllvm"
if [ ! -x "$CARGO_HOME/bin/bpf-linker" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "building bpf-linker $BPF_LINKER_VERSION against LLVM $llvm_major from $NIGHTLY (about a minute)"
  # bpf-linker's RUNPATH names this folder, so it lives in the CARGO_HOME that holds the
  # binary: a shared one (in $HOME) would be re-pointed by a setup for another CARGO_HOME.
  prefix="$CARGO_HOME/relay/llvm-$llvm_major"
  mkdir -p "$prefix/lib" "$CARGO_HOME/bin"
  ln -sf "$libllvm" "$prefix/lib/libLLVM.so"
  ln -sf "$libllvm" "$prefix/lib/$(basename "$libllvm")"
  LLVM_PREFIX="$prefix" LD_LIBRARY_PATH="$prefix/lib" cargo +"$STABLE" install bpf-linker \
    --version "$BPF_LINKER_VERSION" --locked --no-default-features --features "llvm-$llvm_major" \
    --force
  echo "$want" >"$stamp"
fi
# --- cargo-deb (the test suite builds and checks the Debian package) -------------------------
CARGO_DEB_VERSION=3.8.0
if ! cargo +"$STABLE" deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  say "installing cargo-deb $CARGO_DEB_VERSION"
  cargo +"$STABLE" install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi
# --- cargo-fuzz (the test suite runs the fuzz targets for a bounded time) ---------------------
CARGO_FUZZ_VERSION=0.13.1
if ! cargo +"$STABLE" fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  say "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo +"$STABLE" install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
# A shell that runs cargo without rustup's PATH (a bpf-linker --version, say) finds the tools
# only with $CARGO_HOME/bin on its PATH.
case ":$PATH:" in
  *":$CARGO_HOME/bin:"*) ;;
  *) say "note: $CARGO_HOME/bin is not on PATH; add it to run the installed tools directly" ;;
esac
say "ready: $STABLE, $NIGHTLY (+rust-src, miri), bpf-linker $BPF_LINKER_VERSION (LLVM $llvm_major), cargo-deb $CARGO_DEB_VERSION, cargo-fuzz $CARGO_FUZZ_VERSION"
