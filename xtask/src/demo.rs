//! `cargo xtask demo`: a fresh machine to a running Ferry demo in one command.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{setup, workspace};

/// The demo binary lives in the tests crate (`ferry-tests`): it builds
/// simulated nodes the same way the end-to-end tests do.
const DEMO_BINARY: &str = "ferry-demo";

/// Sets up, builds, then becomes `ferry-demo` with `demo_args`.
pub fn demo(demo_args: &[String]) -> Result<()> {
    setup::setup()?;
    workspace::build_binaries()?;
    let binary = workspace::debug_dir().join(DEMO_BINARY);
    if !binary.is_file() {
        bail!(
            "{} does not exist after the build: the demo binary `{DEMO_BINARY}` \
             (a [[bin]] of the tests crate, ferry-tests) has not been written yet",
            binary.display()
        );
    }
    Err(crate::cmd::exec(Command::new(binary).args(demo_args)))
}
