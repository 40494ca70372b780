//! Every random stream of the built-in trainer, derived from the job's `seed` in one place.
//!
//! A stream is `derive_seed(seed, stream id, index)`; streams never share draws, and each is a
//! pure function of its inputs, so a resumed run redraws exactly what an uninterrupted one drew:
//!
//! - [`data_seed`] (stream 1, index 0): the SplitMix64 that generates the synthetic datasets
//!   (Rust side, independent of libtorch; `data.rs`);
//! - [`epoch_order_seed`] (stream 2, index = epoch): the SplitMix64 that shuffles the training
//!   split for that epoch (`data.rs`);
//! - [`init_seed`] (stream 3, index 0): libtorch's `manual_seed` before the model is built, i.e.
//!   the parameter init (`trainer.rs`);
//! - [`step_seed`] (stream 4, index = global step + 1): libtorch's `manual_seed` before that
//!   optimizer step, i.e. dropout (`trainer.rs`); in a data-parallel run rank r > 0 draws from
//!   [`rank_step_seed`] (stream 5 of the step's seed, index = r), rank 0 from the step seed
//!   itself, so a 1-rank run is unchanged and no two ranks share a dropout mask.
//!
//! Changing an id, the mixing, or what a stream seeds changes every result: it is a new
//! checkpoint format, not a refactor.

/// SplitMix64: a tiny, well-mixed PRNG; also used to derive seeds.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

const STREAM_DATA: u64 = 1;
const STREAM_EPOCH_ORDER: u64 = 2;
const STREAM_INIT: u64 = 3;
const STREAM_STEP: u64 = 4;
const STREAM_RANK: u64 = 5;

/// How [`step_seed`] is derived, in words (recorded in `trainer_state.json` for readers).
pub const SCHEME: &str = "manual_seed(derive_seed(seed, 4, global_step + 1)) before each step \
                          (rank r > 0 of a data-parallel run: derive_seed(that, 5, r)); data \
                          order from (seed, epoch)";

/// A seed derived from a base seed, a stream id and an index (different streams never collide
/// in practice).
pub fn derive_seed(seed: u64, stream: u64, index: u64) -> u64 {
    let mut r = SplitMix::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let a = r.next_u64();
    SplitMix::new(a ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
}

/// The seed of the synthetic data generators.
pub fn data_seed(seed: u64) -> u64 {
    derive_seed(seed, STREAM_DATA, 0)
}

/// The seed of the shuffle of `epoch`.
pub fn epoch_order_seed(seed: u64, epoch: u64) -> u64 {
    derive_seed(seed, STREAM_EPOCH_ORDER, epoch)
}

/// libtorch's seed before the model is built (its bits as `i64`, as `manual_seed` takes it).
pub fn init_seed(seed: u64) -> i64 {
    derive_seed(seed, STREAM_INIT, 0) as i64
}

/// libtorch's seed before optimizer step `global_step + 1` runs, i.e. after `global_step`
/// completed steps (its bits as `i64`).
pub fn step_seed(seed: u64, global_step: u64) -> i64 {
    derive_seed(seed, STREAM_STEP, global_step + 1) as i64
}

/// libtorch's seed of rank `rank` before optimizer step `global_step + 1` (rank 0's is
/// [`step_seed`]).
pub fn rank_step_seed(seed: u64, global_step: u64, rank: u32) -> i64 {
    let step = step_seed(seed, global_step);
    if rank == 0 {
        return step;
    }
    derive_seed(step as u64, STREAM_RANK, rank as u64) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_pinned_and_distinct() {
        // Pinned values: a change here changes every run's numbers (see the module doc).
        assert_eq!(data_seed(0), 0x98bc_9b3a_9f64_da94);
        assert_eq!(epoch_order_seed(7, 1), 0x33a1_643a_f894_a1a2);
        assert_eq!(init_seed(7), 0xd40d_0a4f_fa67_9748_u64 as i64);
        assert_eq!(step_seed(7, 9), 0x1149_274f_4631_629a);
        let all = [
            data_seed(7),
            epoch_order_seed(7, 0),
            epoch_order_seed(7, 1),
            init_seed(7) as u64,
            step_seed(7, 0) as u64,
            rank_step_seed(7, 0, 1) as u64,
            rank_step_seed(7, 0, 2) as u64,
        ];
        assert_eq!(rank_step_seed(7, 9, 0), step_seed(7, 9));
        let distinct: std::collections::BTreeSet<u64> = all.iter().copied().collect();
        assert_eq!(distinct.len(), all.len());
    }
}
