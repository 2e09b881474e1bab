//! llama-perplexity's task draw: `std::mt19937` seeded with 1 and, per task, a
//! `std::uniform_int_distribution<size_t>(0, left − 1)` over the tasks not drawn yet
//! (formats/tasks.md#subsets). The distribution is libstdc++'s (GCC 11 and later): for a
//! generator of exactly 32 bits it maps each draw with a 64-bit product and rejects the low
//! words below `2³² mod n` (Lemire's method). Other C++ libraries draw differently; on
//! whole files the order does not change the score.

/// The 32-bit Mersenne Twister (`std::mt19937`).
pub struct Mt19937 {
    state: [u32; 624],
    i: usize,
}

impl Mt19937 {
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for k in 1..624 {
            let p = state[k - 1];
            state[k] = 1_812_433_253u32
                .wrapping_mul(p ^ (p >> 30))
                .wrapping_add(k as u32);
        }
        Mt19937 { state, i: 624 }
    }

    fn twist(&mut self) {
        for k in 0..624 {
            let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % 624] & 0x7fff_ffff);
            let mut v = self.state[(k + 397) % 624] ^ (y >> 1);
            if y & 1 == 1 {
                v ^= 0x9908_b0df;
            }
            self.state[k] = v;
        }
        self.i = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.i >= 624 {
            self.twist();
        }
        let mut y = self.state[self.i];
        self.i += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// libstdc++'s `uniform_int_distribution<size_t>(0, n − 1)` on this generator (`n ≥ 1`,
    /// `n ≤ 2³²`).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!((1..=1 << 32).contains(&n));
        if n == 1 << 32 {
            return self.next_u32() as u64;
        }
        let range = n as u32;
        let mut product = self.next_u32() as u64 * range as u64;
        let mut low = product as u32;
        if low < range {
            let threshold = range.wrapping_neg() % range;
            while low < threshold {
                product = self.next_u32() as u64 * range as u64;
                low = product as u32;
            }
        }
        product >> 32
    }
}

/// The indices (into a file of `total` tasks) of the `n` tasks llama-perplexity scores, in the
/// order it visits them: each draw picks among the tasks left and removes it.
pub fn llama_cpp_order(total: usize, n: usize) -> Vec<usize> {
    let mut rng = Mt19937::new(1);
    let mut left: Vec<usize> = (0..total).collect();
    (0..n.min(total))
        .map(|_| {
            let i = rng.below(left.len() as u64) as usize;
            left.remove(i)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generator's published outputs (seed 5489: the 10,000th is 4123659995, C++11
    /// [rand.predef]; seed 1: the first two).
    #[test]
    fn mt19937_matches_the_standard() {
        let mut g = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
        let mut g = Mt19937::new(1);
        assert_eq!([g.next_u32(), g.next_u32()], [1_791_095_845, 4_282_876_139]);
    }

    /// Orders printed by a C++ program built with g++ 12.2 (libstdc++) that draws exactly as
    /// llama-perplexity's `hellaswag_score` does (source in formats/tasks.md#subsets).
    #[test]
    fn draw_equals_libstdcxx() {
        assert_eq!(
            llama_cpp_order(1000, 20),
            [
                417, 997, 719, 931, 0, 128, 302, 999, 147, 236, 92, 398, 188, 389, 347, 670, 400,
                934, 541, 845
            ]
        );
        assert_eq!(
            llama_cpp_order(10042, 10),
            [4187, 10013, 7233, 9363, 1, 1286, 3036, 10032, 1474, 2371]
        );
        assert_eq!(llama_cpp_order(5, 5), [2, 4, 3, 1, 0]);
    }
}
