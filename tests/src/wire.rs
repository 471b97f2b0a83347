//! What crosses the node-to-node link: a `tcpdump` capture of the fabric and
//! the bytes that must never appear in it.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::ensure;

use crate::{Cluster, Place, Proc, stream};

/// How long tcpdump may take to start capturing.
const START: Duration = Duration::from_secs(30);
/// Lets packets in flight reach tcpdump (and, at the start, lets it settle).
const SETTLE: Duration = Duration::from_millis(300);

/// `tcpdump` on the fabric (every node's link), writing every TCP packet
/// whole to a pcap in the cluster's temporary directory.
pub struct LinkCapture {
    tcpdump: Proc,
    pcap: PathBuf,
}

impl LinkCapture {
    /// Starts the capture; returns once tcpdump is capturing.
    pub fn start(cluster: &mut Cluster) -> anyhow::Result<Self> {
        let pcap = cluster.tempdir().join("link.pcap");
        let pcap_text = pcap.to_string_lossy().into_owned();
        let tcpdump = cluster.spawn(
            Place::Fabric,
            Path::new("/usr/bin/tcpdump"),
            &["-i", "fabric", "-U", "-s", "0", "-w", &pcap_text, "tcp"],
        )?;
        // tcpdump opens its file once it is capturing.
        let deadline = Instant::now() + START;
        while !pcap.exists() {
            ensure!(
                Instant::now() < deadline,
                "tcpdump did not start: {}",
                tcpdump.stderr_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(SETTLE);
        Ok(Self { tcpdump, pcap })
    }

    /// Stops the capture and returns the pcap's bytes.
    pub fn finish(mut self) -> anyhow::Result<Vec<u8>> {
        std::thread::sleep(SETTLE);
        self.tcpdump.kill();
        Ok(std::fs::read(&self.pcap)?)
    }
}

/// The first bytes a `ferry-testapp` client sends: what must never cross
/// the node link in clear.
pub fn plaintext_marker() -> Vec<u8> {
    let mut marker = vec![0; 64];
    stream::Stream::new(stream::SEED_A).fill(&mut marker);
    marker
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}
