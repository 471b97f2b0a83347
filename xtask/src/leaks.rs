//! What the end-to-end tests may leave on the machine when a test does not
//! clean up (found and removed by `ferry_leftovers`, the finder the tests
//! use too): `cargo xtask test` removes stale ones before the suite (so one
//! broken run does not break the next) and fails if the suite leaves any
//! behind.
//!
//! Finding runs no command, so the check after the suite prints nothing and
//! cargo test's summary stays the last thing on screen. Removing prints
//! each step as the shell command it stands for.

use anyhow::{Result, bail};
use ferry_leftovers::{Note, SETTLE, bulleted, find, remove, settle};

use crate::cmd;

/// Before the suite: removes what earlier runs left, with a warning, and
/// fails only if something cannot be removed.
pub fn remove_stale() -> Result<()> {
    cmd::step("looking for leftovers of earlier test runs");
    let stale = find()?;
    if stale.is_empty() {
        cmd::note("none");
        return Ok(());
    }
    cmd::warn(&format!(
        "removing leftovers of an earlier test run:\n{}",
        bulleted(&stale)
    ));
    remove(&stale, &mut |note| match note {
        Note::Doing(line) => cmd::announce_equivalent(line),
        Note::Failed(what) => cmd::warn(what),
    });
    let remaining = settle(SETTLE)?;
    if !remaining.is_empty() {
        bail!(
            "cannot remove these leftovers of an earlier test run (see the warnings above); \
             remove them by hand, then rerun:\n{}",
            bulleted(&remaining)
        );
    }
    Ok(())
}

/// After the suite: fails listing whatever the tests left behind. Silent when
/// nothing is left; gives exiting processes a moment before judging.
pub fn ensure_none_left() -> Result<()> {
    let left = settle(SETTLE)?;
    if !left.is_empty() {
        bail!(
            "tests left behind:\n{}\nevery test must remove what it made, also when it fails; \
             the next `cargo xtask test` removes these before it starts",
            bulleted(&left)
        );
    }
    Ok(())
}
