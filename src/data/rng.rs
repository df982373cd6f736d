//! Small deterministic RNG for the data pipeline: xoshiro256** seeded through SplitMix64.
//!
//! No global state: every random decision takes an explicit [`Rng`] built from
//! [`stream_seed`]`(base, sample index, recycle, purpose)`, so any sample (and any recycle of it)
//! can be rebuilt on its own, on any worker thread, in any order.

/// What a random stream is used for (part of the seed hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum Purpose {
    /// Crop window (shared by all recycles of a sample).
    Crop = 1,
    /// Clamped-FAPE coin (per sample).
    ClampFape = 2,
    /// MSA block deletion, sampling, masking, extra-MSA selection (per recycle).
    Msa = 3,
    /// Dataset sampling order (epoch shuffles, weighted draws).
    Sampler = 4,
}

/// SplitMix64 step (Steele, Lea & Flood 2014): advance `state` by the golden gamma and return the
/// mixed output ([`crate::train::seed::splitmix64`] of the old state).
pub fn splitmix64(state: &mut u64) -> u64 {
    let out = crate::train::seed::splitmix64(*state);
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    out
}

/// Seed of one stream: a hash of (base seed, sample index, recycle, purpose).
pub fn stream_seed(base: u64, sample: u64, recycle: u64, purpose: Purpose) -> u64 {
    let mut s = base;
    let mut h = splitmix64(&mut s);
    for v in [sample, recycle, purpose as u64] {
        let mut t = h ^ v.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        h = splitmix64(&mut t);
    }
    h
}

/// xoshiro256** (Blackman & Vigna 2018).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// Generator seeded from a 64-bit seed through SplitMix64.
    pub fn new(seed: u64) -> Rng {
        let mut st = seed;
        let s = [
            splitmix64(&mut st),
            splitmix64(&mut st),
            splitmix64(&mut st),
            splitmix64(&mut st),
        ];
        Rng { s }
    }

    /// The stream for (base, sample, recycle, purpose).
    pub fn stream(base: u64, sample: u64, recycle: u64, purpose: Purpose) -> Rng {
        Rng::new(stream_seed(base, sample, recycle, purpose))
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, 1) as f32 (24 random bits).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform integer in `0..n` (unbiased, Lemire's method); 0 when n == 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let t = n.wrapping_neg() % n;
            while (m as u64) < t {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }

    /// Uniform integer in `lo..=hi`.
    pub fn range_inclusive(&mut self, lo: usize, hi: usize) -> usize {
        if hi <= lo {
            return lo;
        }
        lo + self.below((hi - lo + 1) as u64) as usize
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }

    /// A random permutation of `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        self.shuffle(&mut v);
        v
    }

    /// Index drawn from unnormalised non-negative weights (last index if they sum to 0).
    pub fn categorical(&mut self, weights: &[f32]) -> usize {
        let total: f32 = weights.iter().sum();
        let mut u = self.next_f32() * total;
        for (i, &w) in weights.iter().enumerate() {
            if u < w {
                return i;
            }
            u -= w;
        }
        weights.len().saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_independent_streams() {
        let a: Vec<u64> = (0..4)
            .map(|_| Rng::stream(7, 3, 1, Purpose::Msa).next_u64())
            .collect();
        assert!(a.iter().all(|&x| x == a[0]));
        let b = Rng::stream(7, 3, 2, Purpose::Msa).next_u64();
        let c = Rng::stream(7, 4, 1, Purpose::Msa).next_u64();
        let d = Rng::stream(7, 3, 1, Purpose::Crop).next_u64();
        let e = Rng::stream(8, 3, 1, Purpose::Msa).next_u64();
        for x in [b, c, d, e] {
            assert_ne!(x, a[0]);
        }
    }

    #[test]
    fn uniform_statistics() {
        let mut r = Rng::new(1);
        let n = 100_000;
        let mean: f64 = (0..n).map(|_| r.next_f64()).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[r.below(5) as usize] += 1;
        }
        for c in counts {
            assert!((c as f64 / n as f64 - 0.2).abs() < 0.01, "{counts:?}");
        }
        let mut p = r.permutation(50);
        p.sort();
        assert_eq!(p, (0..50).collect::<Vec<_>>());
        let mut w = [0usize; 3];
        for _ in 0..30_000 {
            w[r.categorical(&[1.0, 0.0, 3.0])] += 1;
        }
        assert_eq!(w[1], 0);
        assert!((w[2] as f64 / w[0] as f64 - 3.0).abs() < 0.2, "{w:?}");
    }
}
