//! Where the workspace and its build output live, and building its binaries.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::cmd;

/// The workspace root: xtask always runs from there, wherever `cargo xtask`
/// was typed, so relative paths in commands mean the same thing every time.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Where cargo builds (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// Where `cargo build` puts the debug binaries.
pub fn debug_dir() -> PathBuf {
    target_dir().join("debug")
}

/// Builds every binary of the workspace, so the end-to-end tests and the demo
/// find `target/debug/ferry-agent`, `ferry-testapp`, `ferry-demo`… up to date.
pub fn build_binaries() -> Result<()> {
    cmd::step("building the workspace's binaries");
    cmd::run(Command::new("cargo").args(["build", "--workspace", "--bins"]))
        .map_err(|err| err.context("the build failed: fix the errors above, then rerun"))
}
