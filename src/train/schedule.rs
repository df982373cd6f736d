//! AlphaFold2 learning-rate schedule (supplement 1.11.3): linear warmup, constant plateau, then
//! step decay. A pure function of the optimizer step, so a resumed run needs no scheduler state.

use crate::config::OptimConfig;

/// Learning rate used for the update at `step` (0-based count of steps already taken).
///
/// - Warmup: `lr * step / warmup_steps` for `step < warmup_steps` (so the very first update uses
///   LR 0, as in OpenFold's `AlphaFoldLRScheduler`; Adam's moments still accumulate it).
///   `warmup_steps == 0` disables warmup.
/// - Plateau: `lr`.
/// - Decay: from `decay_start` on, `lr * decay_factor^k` with `k = (step - decay_start) /
///   decay_every + 1`, i.e. one more factor at `decay_start`, `decay_start + decay_every`, ...
///
// DISCREPANCY: OpenFold applies the first decay at `step > decay_start` (one step later) but the
// following ones at `decay_start + k * decay_every`; we use one uniform rule (`step >= decay_start`).
pub fn lr_at(step: u64, cfg: &OptimConfig) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * step as f64 / cfg.warmup_steps as f64;
    }
    if step >= cfg.decay_start && cfg.decay_every > 0 {
        let k = (step - cfg.decay_start) / cfg.decay_every + 1;
        let k = i32::try_from(k).unwrap_or(i32::MAX);
        return cfg.lr * cfg.decay_factor.powi(k);
    }
    cfg.lr
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-15 * b.abs().max(1e-30)
    }

    #[test]
    fn af2_defaults() {
        let c = OptimConfig::default();
        assert_eq!(c.lr, 1e-3);
        assert_eq!(lr_at(0, &c), 0.0);
        assert!(close(lr_at(1, &c), 1e-6));
        assert!(close(lr_at(500, &c), 5e-4));
        assert!(close(lr_at(999, &c), 0.999e-3));
        assert_eq!(lr_at(1000, &c), 1e-3);
        assert_eq!(lr_at(49_999, &c), 1e-3);
        assert!(close(lr_at(50_000, &c), 0.95e-3));
        assert!(close(lr_at(99_999, &c), 0.95e-3));
        assert!(close(lr_at(100_000, &c), 0.95 * 0.95 * 1e-3));
        assert!(close(lr_at(150_000, &c), 0.95f64.powi(3) * 1e-3));
    }

    #[test]
    fn warmup_is_linear_and_monotone() {
        let c = OptimConfig {
            lr: 2.0,
            warmup_steps: 4,
            decay_start: 10,
            decay_every: 3,
            decay_factor: 0.5,
            ..OptimConfig::default()
        };
        let got: Vec<f64> = (0..17).map(|s| lr_at(s, &c)).collect();
        let want = [
            0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, // 0..=9
            1.0, 1.0, 1.0, // 10..=12
            0.5, 0.5, 0.5, // 13..=15
            0.25,
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn no_warmup() {
        let c = OptimConfig {
            warmup_steps: 0,
            ..OptimConfig::default()
        };
        assert_eq!(lr_at(0, &c), c.lr);
        assert!(lr_at(0, &c).is_finite());
    }
}
