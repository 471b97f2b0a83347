//! Gives the memory a burst of traffic leaves free back to the kernel.
//!
//! Each shard thread allocates from its own glibc arena, and glibc returns
//! an arena's free memory only from the top of its heap. What 64 busy
//! connections freed in the middle of one (their read buffers, h2's frame
//! buffers) stays resident after they close: in the bench, an agent that
//! held 18.2 MiB fresh held 23.8 MiB after `rr-concurrent` and 31.2 MiB
//! after the full run. So every [`TRIM_EVERY`] the control plane asks how
//! much the arenas hold free and, past [`TRIM_PAST`], has glibc hand the
//! free pages back (`malloc_trim`, which `madvise`s them away in every
//! arena). Nothing on the data path waits for it but an allocation on the
//! arena being trimmed, for the moment of the trim.

use std::time::Duration;

/// How often the arenas' free memory is looked at.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Free memory in the arenas below this is left where it is: it is what
/// the next connections will allocate again.
pub const TRIM_PAST: usize = 2 * 1024 * 1024;

/// Runs for the agent's life on the control plane's runtime.
pub async fn return_freed() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(free) = trim_if_past(TRIM_PAST) {
            tracing::debug!(free, "returned the arenas' free memory to the kernel");
        }
    }
}

/// Trims the heap if its arenas hold more than `past` bytes free; returns
/// how many they held when it did.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim_if_past(past: usize) -> Option<usize> {
    // SAFETY: reads glibc's allocator statistics under its arena locks.
    let free = unsafe { libc::mallinfo2() }.fordblks;
    if free <= past {
        return None;
    }
    // SAFETY: hands free pages of glibc's own arenas back, under their
    // locks; no memory the program holds is touched.
    unsafe { libc::malloc_trim(0) };
    Some(free)
}

/// Other allocators return memory by their own rules.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim_if_past(_past: usize) -> Option<usize> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let line = status
            .lines()
            .find(|line| line.starts_with("VmRSS:"))
            .expect("VmRSS in /proc/self/status");
        line.split_whitespace()
            .nth(1)
            .and_then(|kib| kib.parse().ok())
            .expect("VmRSS in KiB")
    }

    /// Memory freed in the middle of a thread's arena is resident until the
    /// trim, and not after it.
    #[test]
    fn what_a_burst_freed_goes_back_to_the_kernel() {
        let (freed_tx, freed_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        // The thread stays alive through the trim, so its arena stays its own.
        let burst = std::thread::spawn(move || {
            // 64 buffers the size of a relay's, written so they are
            // resident; the one allocated after them stops the arena's
            // top from shrinking by itself when they are freed.
            let mut buffers: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 64 * 1024]).collect();
            let keep = vec![1u8; 1024];
            buffers.clear();
            freed_tx.send(()).expect("test thread");
            let _ = done_rx.recv();
            drop(keep);
        });
        freed_rx.recv().expect("burst thread");
        let before = resident_kib();
        let free = trim_if_past(TRIM_PAST);
        let after = resident_kib();
        done_tx.send(()).expect("burst thread");
        burst.join().expect("burst thread");
        let free = free.expect("the burst left more than TRIM_PAST free");
        assert!(free >= 4 * 1024 * 1024, "only {free} bytes free");
        assert!(
            before.saturating_sub(after) >= 2 * 1024,
            "resident {before} KiB before the trim, {after} KiB after"
        );
    }
}
