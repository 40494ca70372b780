//! Streaming xxh3-128 checksums, computed while bytes are written or read.
//!
//! xxh3-128 runs at ~13 GiB/s on this class of machine, an order of magnitude above disk
//! bandwidth, so checksumming every byte costs next to nothing. It detects corruption, not
//! tampering (it is not a cryptographic hash).

use xxhash_rust::xxh3::Xxh3;

/// The algorithm's name as recorded in `MANIFEST.json`.
pub const ALGORITHM: &str = "xxh3-128";

/// An incremental checksum over a byte stream.
#[derive(Clone)]
pub struct Checksum(Xxh3);

impl Default for Checksum {
    fn default() -> Self {
        Checksum(Xxh3::new())
    }
}

impl Checksum {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest as 32 lowercase hex digits.
    pub fn hex(&self) -> String {
        format!("{:032x}", self.0.digest128())
    }
}

/// Checksum of a whole buffer, as hex.
pub fn hex_of(bytes: &[u8]) -> String {
    let mut c = Checksum::new();
    c.update(bytes);
    c.hex()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_equals_one_shot() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut c = Checksum::new();
        for chunk in data.chunks(997) {
            c.update(chunk);
        }
        assert_eq!(c.hex(), hex_of(&data));
        assert_eq!(c.hex().len(), 32);
        assert_ne!(hex_of(b"a"), hex_of(b"b"));
    }
}
