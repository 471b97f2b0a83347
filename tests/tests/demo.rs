//! `cargo xtask demo` runs `ferry-demo`: it must prove what it claims and
//! leave the machine as it found it.

use std::{process::Command, time::Duration};

use anyhow::{Context as _, ensure};
use ferry_tests::{bin_path, leftovers};

#[test]
fn the_demo_proves_mtls_between_two_nodes_and_cleans_up() -> anyhow::Result<()> {
    let demo = bin_path("ferry-demo")?;
    let started = std::time::Instant::now();
    let output = Command::new(&demo)
        .arg("--exit-after-proof")
        .output()
        .with_context(|| format!("cannot run {}", demo.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "ferry-demo failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    ensure!(
        started.elapsed() < Duration::from_secs(60),
        "the demo took {:?}",
        started.elapsed()
    );
    for expected in [
        "ferry_connect4",
        "ferry_sock_ops",
        "spiffe://cluster.local/ns/shop/sa/client serial",
        "spiffe://cluster.local/ns/shop/sa/server serial",
        "its getpeername() says 198.18.2.2:8080",
        "node 2's agent, at the end of the tunnel",
        "arrived intact: client true, server true",
        "a TLS 1.3 ClientHello for server.shop.sa.cluster.local, and none of the client's plaintext",
        "route tunnel, source identity spiffe://cluster.local/ns/shop/sa/client",
        "route inboundTunnel, source identity spiffe://cluster.local/ns/shop/sa/client",
        "1 TLS connection(s)",
        "original destination 198.18.2.2:8081",
        "removed the nodes",
    ] {
        ensure!(
            stdout.contains(expected),
            "the demo did not print {expected:?}:\n{stdout}"
        );
    }
    let left = leftovers();
    ensure!(left.is_empty(), "the demo left behind: {left:?}");
    Ok(())
}
