//! Builds the eBPF capture programs (`agent-ebpf`) for `bpfel-unknown-none`
//! with aya-build and leaves the object in `OUT_DIR` for `include_bytes_aligned!`.
//! A machine without the eBPF toolchain fails here, saying how to get it.
//! The eBPF build's own output is shown only when it fails.

use std::{
    fs::File,
    io::Write as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
};

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
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
    quietly(&out_dir.join("aya-build.stdout"), || {
        aya_build::build_ebpf([package], aya_build::Toolchain::default())
    })?
    .with_context(|| {
        format!("building agent-ebpf failed (if the toolchain is incomplete, {SETUP_HINT})")
    })
}

/// Runs `build` with this script's stdout captured in `capture`, then passes
/// cargo's directives on. aya-build forwards every line of the eBPF build
/// (cargo's progress, the compiler's messages) as `cargo:warning=`, which
/// cargo would print on every build of ferry-agent; those lines are passed
/// on only if the build failed, so a good build is quiet and a failed one
/// shows everything.
fn quietly<T>(
    capture: &Path,
    build: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<anyhow::Result<T>> {
    const STDOUT: i32 = 1;
    let file =
        File::create(capture).with_context(|| format!("cannot create {}", capture.display()))?;
    std::io::stdout().flush()?;
    // SAFETY: plain descriptor calls on descriptors this process owns; the
    // duplicate of the real stdout is restored and closed below.
    let saved = unsafe { libc::dup(STDOUT) };
    if saved < 0 || unsafe { libc::dup2(file.as_raw_fd(), STDOUT) } < 0 {
        bail!("cannot redirect the eBPF build's output");
    }
    let result = build();
    let _ = std::io::stdout().flush();
    // SAFETY: as above; `saved` is the real stdout duplicated before.
    unsafe {
        libc::dup2(saved, STDOUT);
        libc::close(saved);
    }
    let captured = std::fs::read_to_string(capture)
        .with_context(|| format!("cannot read {}", capture.display()))?;
    for line in captured.lines() {
        let warning = line.starts_with("cargo:warning=") || line.starts_with("cargo::warning=");
        if !warning || result.is_err() {
            println!("{line}");
        }
    }
    Ok(result)
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
