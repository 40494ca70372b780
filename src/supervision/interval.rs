//! The checkpoint interval from data (`checkpoint.interval: auto`): Daly's optimum for the
//! measured save stall and the run's mean time between unannounced interruptions.
//!
//! τ = √(2δM)·[1 + ⅓·√(δ/2M) + (1/9)·(δ/2M)] − δ for δ < 2M, else τ = M (Daly 2006; Young 1974 is
//! the first term), with
//! - δ the median stall of the newest [`RECENT_SAVES`] saves (with two-phase saves the stall,
//!   not the background persist), from the journal and then from this process's saves;
//!   [`ASSUMED_STALL_SECONDS`] before any was measured;
//! - M the run's mean time between *unannounced* interruptions ([`Chain::mtbf`], from the
//!   journal through the one fold): the configured prior (`checkpoint.mtbf`) until the run has
//!   observed one. Announced interruptions get a final save, so they do not shorten τ.
//!
//! No torch here: the trainer feeds the stalls and asks for the interval.

use std::collections::VecDeque;

use super::history::{Chain, Mtbf};

/// Saves whose stalls δ is the median of.
pub const RECENT_SAVES: usize = 5;
/// δ before any save of the run was measured.
pub const ASSUMED_STALL_SECONDS: f64 = 1.0;

/// Daly's optimum interval (seconds of work between saves) for a save costing `delta` seconds
/// and a mean time between failures of `mtbf` seconds.
pub fn daly(delta: f64, mtbf: f64) -> f64 {
    if delta >= 2.0 * mtbf {
        return mtbf;
    }
    let r = delta / (2.0 * mtbf);
    (2.0 * delta * mtbf).sqrt() * (1.0 + r.sqrt() / 3.0 + r / 9.0) - delta
}

/// The interval recommended now, and what it rests on.
#[derive(Debug, Clone, PartialEq)]
pub struct Recommendation {
    pub seconds: f64,
    /// δ, and how many measured saves it is the median of (0: assumed).
    pub stall: f64,
    pub stalls_measured: usize,
    pub mtbf: Mtbf,
}

impl Recommendation {
    /// Why, in words (for the log and the journal).
    pub fn reason(&self) -> String {
        let stall = match self.stalls_measured {
            0 => format!("save stall {:.3} s assumed (none measured yet)", self.stall),
            n => format!(
                "save stall {:.3} s (median of the last {n} saves)",
                self.stall
            ),
        };
        let mtbf = match self.mtbf.observed {
            0 => format!(
                "MTBF {:.0} s, the checkpoint.mtbf prior (no unannounced interruption observed)",
                self.mtbf.seconds
            ),
            n => format!(
                "MTBF {:.0} s ({n} unannounced interruption(s) over {:.0} s of allocations)",
                self.mtbf.seconds, self.mtbf.over_seconds
            ),
        };
        format!("Daly's interval for {stall} and {mtbf}")
    }
}

/// The `auto` interval of one run: seeded from the journal's fold, then fed each save's stall.
#[derive(Debug, Clone)]
pub struct AutoInterval {
    mtbf: Mtbf,
    stalls: VecDeque<f64>,
}

impl AutoInterval {
    /// From the run's history (its allocations so far) and the prior MTBF.
    pub fn from_history(chain: &Chain, prior_mtbf_seconds: f64) -> AutoInterval {
        AutoInterval {
            mtbf: chain.mtbf(prior_mtbf_seconds),
            stalls: chain.recent_save_stalls(RECENT_SAVES).into(),
        }
    }

    /// A save's measured stall.
    pub fn note_stall(&mut self, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        if self.stalls.len() == RECENT_SAVES {
            self.stalls.pop_front();
        }
        self.stalls.push_back(seconds);
    }

    pub fn recommend(&self) -> Recommendation {
        let (stall, n) = if self.stalls.is_empty() {
            (ASSUMED_STALL_SECONDS, 0)
        } else {
            let mut v: Vec<f64> = self.stalls.iter().copied().collect();
            v.sort_by(f64::total_cmp);
            let m = v.len();
            let med = if m % 2 == 1 {
                v[m / 2]
            } else {
                (v[m / 2 - 1] + v[m / 2]) / 2.0
            };
            (med, m)
        };
        Recommendation {
            seconds: daly(stall, self.mtbf.seconds),
            stall,
            stalls_measured: n,
            mtbf: self.mtbf,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_MTBF_SECONDS;
    use crate::supervision::events::Stamped;
    use crate::supervision::history::fold;
    use serde_json::json;

    #[test]
    fn daly_is_young_plus_corrections_and_m_beyond_two_m() {
        // δ = 10 s, M = 1 h: √(2·10·3600) = 268.33; r = 10/7200.
        let r: f64 = 10.0 / 7200.0;
        let want = (72000f64).sqrt() * (1.0 + r.sqrt() / 3.0 + r / 9.0) - 10.0;
        assert!((daly(10.0, 3600.0) - want).abs() < 1e-9);
        assert!(
            (daly(10.0, 3600.0) - 261.703).abs() < 0.001,
            "{}",
            daly(10.0, 3600.0)
        );
        // Small δ/M: close to Young's √(2δM).
        let young = (2.0 * 0.5 * 86400f64).sqrt();
        assert!((daly(0.5, 86400.0) - young).abs() / young < 0.01);
        // δ ≥ 2M: τ = M.
        assert_eq!(daly(100.0, 50.0), 50.0);
        assert_eq!(daly(100.0, 49.0), 49.0);
    }

    fn ev(ts: u64, v: serde_json::Value) -> Stamped {
        let mut v = v;
        v["ts"] = json!(humantime::format_rfc3339(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000 + ts)
        )
        .to_string());
        Stamped::from_value(v)
    }
    fn start(ts: u64) -> Stamped {
        ev(ts, json!({"event": "allocation_start", "restart_count": 0}))
    }
    fn commit(ts: u64, step: u64, stall: f64) -> Stamped {
        ev(
            ts,
            json!({"event": "checkpoint_committed", "checkpoint": format!("step-{step:012}"),
                  "step": step, "bytes": 1, "seconds": 2.0, "stall_seconds": stall}),
        )
    }
    fn end(ts: u64, ending: &str) -> Stamped {
        ev(
            ts,
            json!({"event": "allocation_end", "ending": ending, "decision": "requeue",
                  "reason": "r", "action": "a", "exit_code": 11}),
        )
    }
    fn signal(ts: u64) -> Stamped {
        ev(
            ts,
            json!({"event": "signal_received", "signal": "USR1", "warning": true}),
        )
    }

    #[test]
    fn mtbf_from_the_journal_counts_only_unannounced_interruptions() {
        let chain = fold(&[
            // 1000 s, killed (no end): unannounced.
            start(0),
            commit(500, 10, 0.2),
            commit(1000, 20, 0.4),
            // 2000 s, warning signal then a final commit: announced.
            start(1100),
            signal(3000),
            commit(3050, 30, 0.3),
            end(3100, "warning_signal"),
            // 900 s, crashed with no final commit: unannounced.
            start(3200),
            commit(3600, 40, 0.5),
            end(4100, "failed"),
            // The running allocation: not counted.
            start(4200),
            commit(4300, 50, 0.1),
        ]);
        let m = chain.mtbf(DEFAULT_MTBF_SECONDS);
        assert_eq!(m.observed, 2);
        assert_eq!(m.over_seconds, 1000.0 + 2000.0 + 900.0);
        assert_eq!(m.seconds, 1950.0);
        let a = AutoInterval::from_history(&chain, DEFAULT_MTBF_SECONDS);
        let r = a.recommend();
        // The last 5 stalls: 0.4, 0.3, 0.5, 0.1 and 0.2 → median 0.3.
        assert_eq!((r.stall, r.stalls_measured), (0.3, 5));
        assert_eq!(r.seconds, daly(0.3, 1950.0));
        assert!(r.reason().contains("2 unannounced"), "{}", r.reason());
    }

    #[test]
    fn the_prior_holds_until_an_unannounced_interruption_is_observed() {
        let chain = fold(&[
            start(0),
            signal(3000),
            commit(3010, 30, 0.3),
            end(3100, "warning_signal"),
            start(3200),
        ]);
        let m = chain.mtbf(7200.0);
        assert_eq!((m.seconds, m.observed), (7200.0, 0));
        // A fresh run: the prior and the assumed stall.
        let mut a = AutoInterval::from_history(&fold(&[start(0)]), 7200.0);
        let r = a.recommend();
        assert_eq!(
            (r.stall, r.stalls_measured, r.seconds),
            (ASSUMED_STALL_SECONDS, 0, daly(1.0, 7200.0))
        );
        assert!(r.reason().contains("assumed") && r.reason().contains("prior"));
        for s in [2.0, 4.0, 3.0, 9.0, 1.0, 5.0] {
            a.note_stall(s);
        }
        // The newest five: 4, 3, 9, 1, 5 → 4.
        assert_eq!(a.recommend().stall, 4.0);
    }
}
