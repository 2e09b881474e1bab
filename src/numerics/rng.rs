//! SplitMix64 (Steele, Lea, Flood 2014): tiny, fast and fully specified, so seeded outputs do not
//! depend on a third-party crate's generator choices.

/// A SplitMix64 stream.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// An independent stream for (seed, a, b): used to give every chunk of every tensor its own
    /// stream, so output does not depend on the order chunks are generated in.
    pub fn keyed(seed: u64, a: u64, b: u64) -> Self {
        let mut s = SplitMix64(seed ^ 0x6d69_6e69_7472_6f6e);
        let x = s.next_u64() ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut s = SplitMix64(x);
        let y = s.next_u64() ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        SplitMix64(y)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 bits of precision.
    pub fn unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform integer in `0..n` (n > 0), by rejection so it is unbiased.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }
}
