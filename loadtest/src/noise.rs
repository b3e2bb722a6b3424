//! `loadtest noise --percent 30`: a noisy neighbour. Spins for `percent` of
//! every `period_ms` and sleeps the rest, until killed, so that a benchmark
//! can pin it beside the server it measures (`NOISE=30 loadtest/bench.sh`)
//! and see how the server's tail degrades when its core is shared.

use std::time::{Duration, Instant};

use clap::Args;

#[derive(Debug, Args)]
pub struct NoiseArgs {
    /// Share of one core to take, percent (0-100).
    #[arg(long, default_value_t = 30.0)]
    pub percent: f64,
    /// Length of one busy + idle cycle, ms.
    #[arg(long, default_value_t = 10.0)]
    pub period_ms: f64,
    /// Stop after this many seconds (0: run until killed).
    #[arg(long, default_value_t = 0.0)]
    pub seconds: f64,
}

/// Runs on the calling thread (the command gets a one-thread runtime and
/// never yields to it).
pub fn noise(args: &NoiseArgs) -> anyhow::Result<()> {
    if !(0.0..=100.0).contains(&args.percent) || args.period_ms <= 0.0 {
        anyhow::bail!("--percent must be 0-100 and --period-ms above 0");
    }
    let period = Duration::from_secs_f64(args.period_ms / 1000.0);
    let busy = period.mul_f64(args.percent / 100.0);
    let start = Instant::now();
    let mut x = 0u64;
    loop {
        let cycle = Instant::now();
        while cycle.elapsed() < busy {
            // Work the optimiser cannot drop.
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let rest = period.saturating_sub(cycle.elapsed());
        if !rest.is_zero() {
            std::thread::sleep(rest);
        }
        if args.seconds > 0.0 && start.elapsed().as_secs_f64() >= args.seconds {
            return Ok(());
        }
    }
}
