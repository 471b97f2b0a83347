//! Builds the eBPF capture programs (`agent-ebpf`) for `bpfel-unknown-none`
//! with aya-build and leaves the object in `OUT_DIR` for `include_bytes_aligned!`.
//! A machine without the eBPF toolchain fails here, saying how to get it.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

const SETUP_HINT: &str = "run `cargo xtask setup` to install the eBPF toolchain";

fn main() -> anyhow::Result<()> {
    check_toolchain()
        .with_context(|| format!("cannot build Ferry's eBPF programs: {SETUP_HINT}"))?;
    let ebpf_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../agent-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to agent-ebpf")?;
    let package = aya_build::Package {
        name: "ferry-agent-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).with_context(|| {
        format!("building agent-ebpf failed (if the toolchain is incomplete, {SETUP_HINT})")
    })
}

/// bpf-linker on PATH and the nightly toolchain's `rust-src` (for `-Z build-std=core`).
fn check_toolchain() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|out| out.status.success()) {
        bail!("bpf-linker is not on PATH");
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("cannot run `rustup run nightly rustc`: is the nightly toolchain installed?")?;
    if !sysroot.status.success() {
        bail!("the nightly toolchain is missing");
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        bail!("the nightly toolchain lacks the rust-src component");
    }
    Ok(())
}
