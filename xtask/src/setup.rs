//! `cargo xtask setup`: everything building and testing Ferry needs on a fresh
//! Debian 12 machine (see /work/shared/TOOLCHAIN.md for why each piece). Every
//! step checks first and changes nothing that is already right, so a second
//! run takes seconds and setup can run before every `test` and `demo`.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, mounts};

/// Debian packages: LLVM 22 (+ Polly, zstd) to build bpf-linker, bpftool to
/// inspect what the agent loaded, iproute2 for the simulated nodes' network
/// namespaces and veths, tcpdump to look at their traffic, openssl (the
/// tests' independent certificate verifier), curl for the admin endpoint,
/// stunnel4 and haproxy (the benchmark's baselines: what one would use
/// without a mesh), redis-server + redis-tools and nginx + wrk (the real
/// applications and load generators the benchmark runs through each data
/// path; Debian's policy-rc.d keeps their system services from starting),
/// python3-venv for the venv that holds
/// kubernetes-validate, gcc for aws-lc-sys (the crypto provider's C core,
/// built from source by cargo).
pub const DEBIAN_PACKAGES: &[&str] = &[
    "gcc",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "bpftool",
    "iproute2",
    "tcpdump",
    "openssl",
    "curl",
    "stunnel4",
    "haproxy",
    "redis-server",
    "redis-tools",
    "nginx",
    "wrk",
    "python3-venv",
];

/// bpf-linker links the eBPF object; its LLVM (22) must be at least the LLVM
/// of the nightly rustc that compiles agent-ebpf (also 22).
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
/// Without this prefix bpf-linker's build finds Debian's default LLVM 14.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// cargo-fuzz drives the fuzz targets (`fuzz/`, `cargo xtask fuzz`) with the
/// nightly toolchain, whose rustc ships the sanitizer runtimes it links.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The manifests test (`tests/tests/manifests.rs`) checks `daemonset/` with
/// kubernetes-validate from PyPI, installed into a venv of its own because
/// Debian 12's pip refuses to install into the system Python.
pub const TOOLS_VENV: &str = "/opt/ferry-tools";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// Where the agent pins its maps (`/sys/fs/bpf/ferry/<node>/…`).
const BPF_FS: &str = "/sys/fs/bpf";
/// Where a cgroup v2 hierarchy is mounted if the machine has none.
const FALLBACK_CGROUP2: &str = "/run/ferry/cgroup2";

/// Runs every setup step in order (packages first: bpf-linker builds with them).
pub fn setup() -> Result<()> {
    let started = Instant::now();
    ensure_root()?;
    ensure_debian_packages()?;
    ensure_rust_components()?;
    ensure_cargo_tool(&BPF_LINKER)?;
    ensure_fuzzing()?;
    ensure_kubernetes_validate()?;
    ensure_bpffs()?;
    ensure_cgroup2()?;
    println!(
        "setup: all in place ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Installing packages, mounting, and the tests' namespaces all need root;
/// saying so up front beats a permission error halfway through.
fn ensure_root() -> Result<()> {
    cmd::step("checking that we run as root");
    if effective_uid()? != 0 {
        bail!(
            "cargo xtask must run as root: it installs Debian packages, mounts bpffs and cgroup2, \
             and the tests create network namespaces; rerun it as root \
             (e.g. `sudo -E env PATH=\"$PATH\" cargo xtask setup`)"
        );
    }
    cmd::note("uid 0");
    Ok(())
}

/// The effective uid, from `/proc/self/status` (std has no geteuid).
fn effective_uid() -> Result<u32> {
    let status =
        fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let uids = status.lines().find_map(|line| line.strip_prefix("Uid:"));
    let euid = uids.and_then(|uids| uids.split_whitespace().nth(1));
    euid.and_then(|uid| uid.parse().ok())
        .context("no effective uid in /proc/self/status")
}

fn ensure_debian_packages() -> Result<()> {
    cmd::step(&format!(
        "checking Debian packages: {}",
        DEBIAN_PACKAGES.join(" ")
    ));
    let missing = missing_debian_packages()?;
    if missing.is_empty() {
        cmd::note("all installed");
        return Ok(());
    }
    cmd::note(&format!("missing: {}", missing.join(" ")));
    let hint = "check that the machine reaches the Debian mirrors (deb.debian.org), then rerun";
    cmd::run(Command::new("apt-get").arg("update")).with_context(|| hint.to_owned())?;
    let mut install = Command::new("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y"])
        .args(&missing);
    cmd::run(&mut install).with_context(|| hint.to_owned())
}

/// The packages of [`DEBIAN_PACKAGES`] that dpkg does not report as installed
/// (unknown packages print nothing, so anything not listed counts as missing).
fn missing_debian_packages() -> Result<Vec<&'static str>> {
    let mut query = Command::new("dpkg-query");
    query
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(DEBIAN_PACKAGES);
    let out = cmd::probe(&mut query)?;
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    let installed: Vec<&str> = listed
        .lines()
        .filter(|line| line.ends_with(" install ok installed"))
        .filter_map(|line| line.split(' ').next())
        .collect();
    Ok(DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|package| !installed.contains(package))
        .collect())
}

/// agent-ebpf is built with `-Z build-std=core`, which needs the library
/// sources; `cargo xtask test` checks formatting and lints with the default
/// toolchain's rustfmt and clippy.
fn ensure_rust_components() -> Result<()> {
    ensure_component("nightly", "rust-src")?;
    ensure_component("stable", "rustfmt")?;
    ensure_component("stable", "clippy")
}

fn ensure_component(toolchain: &str, component: &str) -> Result<()> {
    cmd::step(&format!(
        "checking the {toolchain} toolchain's {component} component"
    ));
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        toolchain,
        "--installed",
    ]))
    .with_context(|| {
        format!(
            "cannot list the {toolchain} toolchain's components: Ferry builds with stable, and its \
             eBPF programs with nightly; install it with `rustup toolchain install {toolchain}`"
        )
    })?;
    let prefix = format!("{component}-");
    if installed
        .lines()
        .any(|line| line == component || line.starts_with(&prefix))
    {
        cmd::note("installed");
        return Ok(());
    }
    cmd::note("missing");
    cmd::run(Command::new("rustup").args(["component", "add", component, "--toolchain", toolchain]))
        .with_context(|| {
            format!(
                "cannot add {component} to the {toolchain} toolchain: check access to static.rust-lang.org, then rerun"
            )
        })
}

/// A tool `cargo install` builds, pinned to one version.
struct CargoTool {
    /// What `--version` calls it.
    name: &'static str,
    version: &'static str,
    /// The command that prints `<name> <version>`.
    probe: &'static [&'static str],
    install: fn() -> Result<()>,
}

const BPF_LINKER: CargoTool = CargoTool {
    name: "bpf-linker",
    version: BPF_LINKER_VERSION,
    probe: &["bpf-linker", "--version"],
    install: install_bpf_linker,
};

const CARGO_FUZZ: CargoTool = CargoTool {
    name: "cargo-fuzz",
    version: CARGO_FUZZ_VERSION,
    probe: &["cargo", "fuzz", "--version"],
    install: install_cargo_fuzz,
};

/// Installs `tool` unless the version on PATH is the pinned one.
fn ensure_cargo_tool(tool: &CargoTool) -> Result<()> {
    let CargoTool { name, version, .. } = tool;
    cmd::step(&format!("checking {name} {version}"));
    match tool.installed() {
        Some(found) if found == *version => {
            cmd::note(&format!("{name} {found}"));
            return Ok(());
        }
        Some(found) => cmd::note(&format!("found {name} {found}, need {version}")),
        None => cmd::note("not found on PATH"),
    }
    (tool.install)()?;
    match tool.installed() {
        Some(found) if found == *version => {
            cmd::note(&format!("installed {name} {found}"));
            Ok(())
        }
        found => bail!(
            "cargo installed {name} {version} into {}, but `{}` runs {}: \
             put that directory first on PATH, then rerun",
            cargo_bin_dir().display(),
            tool.probe.join(" "),
            found.map_or_else(|| "nothing".to_owned(), |found| format!("version {found}")),
        ),
    }
}

impl CargoTool {
    /// The version the probe reports (`bpf-linker 0.13.0`), if it runs.
    fn installed(&self) -> Option<String> {
        let (program, args) = self.probe.split_first()?;
        let out = cmd::probe(Command::new(program).args(args)).ok()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status
            .success()
            .then(|| stdout.split_whitespace().nth(1).map(str::to_owned))
            .flatten()
    }
}

/// Builds bpf-linker from crates.io against Debian's LLVM 22 (a few minutes).
fn install_bpf_linker() -> Result<()> {
    let llvm_bin = Path::new(LLVM_PREFIX).join("bin");
    let path = env::join_paths(
        std::iter::once(llvm_bin).chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )
    .context("cannot put the LLVM 22 directory on PATH")?;
    let mut install = Command::new("cargo");
    install
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("PATH", path)
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .args([
            "--no-default-features",
            "--features",
            BPF_LINKER_LLVM_FEATURE,
        ]);
    cmd::run(&mut install).with_context(|| {
        format!(
            "building bpf-linker failed: check that {LLVM_PREFIX} holds LLVM 22 \
             (Debian package llvm-22-dev) and that crates.io is reachable, then rerun"
        )
    })
}

/// cargo-fuzz [`CARGO_FUZZ_VERSION`] and the nightly toolchain it builds
/// with. The only setup `cargo xtask fuzz` needs, so fuzzing runs without root.
pub fn ensure_fuzzing() -> Result<()> {
    ensure_cargo_tool(&CARGO_FUZZ)?;
    ensure_nightly()
}

fn install_cargo_fuzz() -> Result<()> {
    cmd::run(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))
    .context("cannot install cargo-fuzz: check that crates.io is reachable, then rerun")
}

fn ensure_nightly() -> Result<()> {
    cmd::probe(Command::new("rustc").arg("+nightly").arg("--version"))?
        .status
        .success()
        .then_some(())
        .context(
            "the nightly toolchain is missing (cargo-fuzz builds with it): \
             install it with `rustup toolchain install nightly`, then rerun",
        )
}

/// Where `cargo install` puts binaries: `$CARGO_INSTALL_ROOT/bin`, else `$CARGO_HOME/bin`.
fn cargo_bin_dir() -> PathBuf {
    let home = || env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo"));
    let root = env::var_os("CARGO_INSTALL_ROOT")
        .or_else(|| env::var_os("CARGO_HOME"))
        .map(PathBuf::from);
    root.or_else(home).unwrap_or_default().join("bin")
}

fn ensure_kubernetes_validate() -> Result<()> {
    cmd::step(&format!(
        "checking kubernetes-validate {KUBERNETES_VALIDATE_VERSION} in {TOOLS_VENV}"
    ));
    let venv = Path::new(TOOLS_VENV);
    let tool = venv.join("bin/kubernetes-validate");
    let version = || {
        let out = cmd::probe(Command::new(&tool).arg("--version")).ok()?;
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        out.status.success().then_some(stdout)
    };
    match version() {
        Some(found) if found == KUBERNETES_VALIDATE_VERSION => {
            cmd::note(&format!("kubernetes-validate {found}"));
            return Ok(());
        }
        Some(found) => cmd::note(&format!("found {found}")),
        None => cmd::note("not installed"),
    }
    if !venv.join("bin/pip").is_file() {
        // Debian's python3, whose python3-venv setup just made sure of.
        cmd::run(Command::new("/usr/bin/python3").args(["-m", "venv", TOOLS_VENV]))
            .context("cannot create the tools venv (Debian package python3-venv)")?;
    }
    cmd::run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--disable-pip-version-check",
        "--quiet",
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
    ]))
    .context("cannot install kubernetes-validate: check that PyPI is reachable, then rerun")?;
    match version() {
        Some(found) if found == KUBERNETES_VALIDATE_VERSION => {
            cmd::note(&format!("installed kubernetes-validate {found}"));
            Ok(())
        }
        found => bail!(
            "pip installed kubernetes-validate {KUBERNETES_VALIDATE_VERSION}, but {} reports {found:?}",
            tool.display()
        ),
    }
}

/// The agent pins its maps in bpffs so that `bpftool` can read them and an
/// agent restart keeps redirection in place.
fn ensure_bpffs() -> Result<()> {
    cmd::step(&format!("checking bpffs at {BPF_FS}"));
    let point = Path::new(BPF_FS);
    if mounts::is_mounted(point, "bpf")? {
        cmd::note("mounted");
        return Ok(());
    }
    cmd::note("not mounted");
    create_dir(point)?;
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPF_FS]))
        .context("cannot mount bpffs: is this a container without CAP_SYS_ADMIN?")?;
    if !mounts::is_mounted(point, "bpf")? {
        bail!("`mount -t bpf bpf {BPF_FS}` succeeded but {BPF_FS} is still not a bpffs");
    }
    cmd::note("mounted");
    Ok(())
}

/// The capture programs attach to each pod's cgroup v2 directory; machines
/// that only mount cgroup v1 controllers get a cgroup2 mount of their own.
fn ensure_cgroup2() -> Result<()> {
    cmd::step("checking for a cgroup v2 hierarchy");
    if let Some(point) = mounts::cgroup2_points()?.first() {
        cmd::note(&format!("mounted at {}", point.display()));
        return Ok(());
    }
    cmd::note("none mounted");
    create_dir(Path::new(FALLBACK_CGROUP2))?;
    cmd::run(Command::new("mount").args(["-t", "cgroup2", "none", FALLBACK_CGROUP2]))
        .context("cannot mount cgroup2: is this a container without CAP_SYS_ADMIN?")?;
    if mounts::cgroup2_points()?.is_empty() {
        bail!("`mount -t cgroup2 none {FALLBACK_CGROUP2}` succeeded but no cgroup2 mount appeared");
    }
    cmd::note(&format!("mounted at {FALLBACK_CGROUP2}"));
    Ok(())
}

/// `mkdir -p`, printed like a command because it changes the machine.
fn create_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    cmd::announce_equivalent(&format!("mkdir -p {}", dir.display()));
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}
