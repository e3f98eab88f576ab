//! A small deterministic random generator (xorshift64*) for generated test input: the same
//! seed gives the same input, so a failure replays.

/// xorshift64* over a non-zero state.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (0 is replaced, as xorshift never leaves 0).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_numbers_and_bounds_hold() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        let xs: Vec<u64> = (0..50).map(|_| a.below(7)).collect();
        let ys: Vec<u64> = (0..50).map(|_| b.below(7)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 7));
        assert!(xs.iter().any(|x| *x != xs[0]), "not constant");
        assert_ne!(Rng::new(0).next_u64(), 0);
        assert_eq!(Rng::new(1).bytes(5).len(), 5);
    }
}
