//! Deterministic byte streams. The client sends stream A and the server
//! answers with stream B, so either side can tell whether the bytes that
//! arrived are exactly the bytes that were sent (none lost, reordered,
//! duplicated or mixed up between connections) without a second channel.

/// Seed of the stream a client sends (`ferry-testapp connect`).
pub const SEED_A: u64 = 0xA5A5_0001_F0F0_1234;
/// Seed of the stream a server answers with (`ferry-testapp serve`).
pub const SEED_B: u64 = 0x5B5B_0002_0F0F_4321;

/// An endless pseudo-random byte stream (splitmix64): cheap enough to
/// generate and check at memory speed, and different for different seeds.
#[derive(Debug, Clone)]
pub struct Stream {
    state: u64,
    /// The bytes of the current 64-bit word not yet handed out.
    pending: [u8; 8],
    pending_len: usize,
}

impl Stream {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            pending: [0; 8],
            pending_len: 0,
        }
    }

    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for byte in buf {
            if self.pending_len == 0 {
                self.pending = self.next_word().to_le_bytes();
                self.pending_len = 8;
            }
            *byte = self.pending[8 - self.pending_len];
            self.pending_len -= 1;
        }
    }

    fn next_word(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Checks received bytes, chunk by chunk, against a stream.
#[derive(Debug, Clone)]
pub struct Verifier {
    expected: Stream,
    scratch: Vec<u8>,
    received: u64,
    intact: bool,
}

impl Verifier {
    pub fn new(seed: u64) -> Self {
        Self {
            expected: Stream::new(seed),
            scratch: Vec::new(),
            received: 0,
            intact: true,
        }
    }

    /// Takes the next chunk that arrived.
    pub fn update(&mut self, chunk: &[u8]) {
        self.scratch.resize(chunk.len(), 0);
        self.expected.fill(&mut self.scratch);
        self.intact &= self.scratch == chunk;
        self.received += chunk.len() as u64;
    }

    /// How many bytes arrived so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Whether every byte so far matched the stream (a prefix of it arrived).
    pub fn intact(&self) -> bool {
        self.intact
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_stream() {
        let mut whole = vec![0; 100];
        Stream::new(SEED_A).fill(&mut whole);
        let mut pieces = Stream::new(SEED_A);
        let mut joined = Vec::new();
        for size in [1, 7, 8, 13, 71] {
            let mut piece = vec![0; size];
            pieces.fill(&mut piece);
            joined.extend(piece);
        }
        assert_eq!(joined, whole);
    }

    #[test]
    fn verifier_spots_a_changed_byte_and_another_stream() {
        let mut bytes = vec![0; 4096];
        Stream::new(SEED_A).fill(&mut bytes);
        let mut good = Verifier::new(SEED_A);
        good.update(&bytes[..1000]);
        good.update(&bytes[1000..]);
        assert!(good.intact());
        assert_eq!(good.received(), 4096);

        bytes[2000] ^= 1;
        let mut bad = Verifier::new(SEED_A);
        bad.update(&bytes);
        assert!(!bad.intact());

        let mut other = Verifier::new(SEED_B);
        other.update(&bytes[..8]);
        assert!(!other.intact());
    }
}
