//! Running external commands so that each one is printed before it runs (and
//! can be replayed by hand), and every failure names the command that failed.

use std::{
    env,
    ffi::OsStr,
    fs::File,
    io,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, ExitStatus, Output},
};

use anyhow::{Context as _, Result, anyhow, bail};

/// Prints the heading of one step of a task.
pub fn step(what: &str) {
    println!("==> {what}");
}

/// Prints what a step found or did, under its heading.
pub fn note(what: &str) {
    println!("    {what}");
}

/// Prints a warning that does not stop the task.
pub fn warn(what: &str) {
    println!("warning: {what}");
}

/// Runs `cmd` with inherited stdio and fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    announce(cmd);
    let status = cmd.status().map_err(|err| start_error(cmd, &err))?;
    check_status(cmd, status)
}

/// Runs `cmd` with stdout and stderr both written to `log`, for programs
/// too talkative for the terminal; returns how it exited, success or not.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<ExitStatus> {
    println!(
        "$ {} > {} 2>&1",
        display(cmd),
        quote(&log.display().to_string())
    );
    let file = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let stderr = file
        .try_clone()
        .with_context(|| format!("cannot share {}", log.display()))?;
    cmd.stdout(file).stderr(stderr);
    cmd.status().map_err(|err| start_error(cmd, &err))
}

/// Runs `cmd` and returns its stdout; on failure the error carries its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = probe(cmd)?;
    check_status(cmd, out.status).with_context(|| stderr_of(&out))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` and returns whatever came out, successful or not: for checks
/// where a failing command is an answer (something is missing), not an error.
pub fn probe(cmd: &mut Command) -> Result<Output> {
    announce(cmd);
    cmd.output().map_err(|err| start_error(cmd, &err))
}

/// Replaces this process with `cmd`, so the program gets the terminal and its
/// exit status becomes ours. Returns only if it could not be started.
pub fn exec(cmd: &mut Command) -> anyhow::Error {
    announce(cmd);
    let err = cmd.exec();
    start_error(cmd, &err)
}

/// Prints the shell equivalent of a change xtask makes itself (`mkdir -p`,
/// `rmdir`, …), so those show up like the commands it runs.
pub fn announce_equivalent(line: &str) {
    println!("$ {line}");
}

fn announce(cmd: &Command) {
    println!("$ {}", display(cmd));
}

fn start_error(cmd: &Command, err: &io::Error) -> anyhow::Error {
    let program = cmd.get_program().to_string_lossy();
    if err.kind() == io::ErrorKind::NotFound {
        anyhow!("cannot run `{program}`: it is not installed or not on PATH")
    } else {
        anyhow!("cannot run `{}`: {err}", display(cmd))
    }
}

fn check_status(cmd: &Command, status: ExitStatus) -> Result<()> {
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

fn stderr_of(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    format!("its error output was: {}", stderr.trim())
}

/// `cmd` as a shell line: `VAR=value program args…`, quoted where needed.
pub fn display(cmd: &Command) -> String {
    let env = cmd.get_envs().filter_map(|(key, value)| {
        Some(format!(
            "{}={}",
            key.to_string_lossy(),
            env_value(key, value?)
        ))
    });
    let words = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|word| quote(&word.to_string_lossy()));
    env.chain(words).collect::<Vec<_>>().join(" ")
}

/// Shows a PATH that prefixes the inherited one as `PREFIX:$PATH`, not in full.
fn env_value(key: &OsStr, value: &OsStr) -> String {
    let value = value.to_string_lossy();
    let inherited = env::var("PATH").unwrap_or_default();
    match value.strip_suffix(inherited.as_str()) {
        Some(prefix) if key == "PATH" && !inherited.is_empty() => format!("{}$PATH", quote(prefix)),
        _ => quote(&value),
    }
}

/// Quotes `word` for a POSIX shell unless it is made of harmless characters.
fn quote(word: &str) -> String {
    let harmless = |c: char| c.is_ascii_alphanumeric() || "_-+=:,./@%".contains(c);
    if !word.is_empty() && word.chars().all(harmless) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_env_and_quotes_special_words() {
        let mut cmd = Command::new("dpkg-query");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-W", "-f=${Status}\\n", "it's"]);
        assert_eq!(
            display(&cmd),
            r"DEBIAN_FRONTEND=noninteractive dpkg-query -W '-f=${Status}\n' 'it'\''s'"
        );
    }

    #[test]
    fn shows_a_prefixed_path_briefly() {
        let inherited = env::var("PATH").unwrap_or_default();
        let mut cmd = Command::new("cargo");
        cmd.env("PATH", format!("/usr/lib/llvm-22/bin:{inherited}"));
        if !inherited.is_empty() {
            assert_eq!(display(&cmd), "PATH=/usr/lib/llvm-22/bin:$PATH cargo");
        }
    }
}
