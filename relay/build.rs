//! Finds the XDP object that `cargo xtask build-ebpf` left, for `include_bytes_aligned!`.
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target"));
    // An explicit path wins: builds into another target dir (the loom run) reuse the object.
    println!("cargo:rerun-if-env-changed=RELAY_XDP_OBJ");
    let obj = std::env::var_os("RELAY_XDP_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("bpfel-unknown-none/release/relay-xdp"));
    println!("cargo:rerun-if-changed={}", obj.display());
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    if !obj.exists() {
        panic!(
            "\n\nthe XDP program is not built: {} is missing.\n\
             Run `cargo xtask build-ebpf` first (it installs the nightly and bpf-linker it needs).\n\n",
            obj.display()
        );
    }
    println!("cargo:rustc-env=RELAY_XDP_OBJ={}", obj.display());
    // The front program for NICs that hand the VLAN tag over as metadata, built beside it.
    let hint = obj.with_file_name("relay-vlan-hint.o");
    println!("cargo:rerun-if-changed={}", hint.display());
    if !hint.exists() {
        panic!(
            "\n\nthe XDP front program is not built: {} is missing.\n\
             Run `cargo xtask build-ebpf` first.\n\n",
            hint.display()
        );
    }
    println!("cargo:rustc-env=RELAY_VLAN_HINT_OBJ={}", hint.display());
}
