//! Sizing connection caps from the process's descriptor limit
//! (`RLIMIT_NOFILE`): the caps of all listeners together must stay under it,
//! with room left for files, upstream links and the like, so a flood on one
//! listener can never make `accept` fail (EMFILE) on another.

use nix::sys::resource::{Resource, getrlimit};

/// Budget used when the limit is unknown or unlimited.
const UNLIMITED_BUDGET: u64 = 65_536;

/// The soft `RLIMIT_NOFILE` (None if it cannot be read or is unlimited).
pub fn fd_limit() -> Option<u64> {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) if soft != nix::sys::resource::RLIM_INFINITY => Some(soft),
        _ => None,
    }
}

/// Splits what `limit` leaves after a reserve (`reserve`, or a quarter of
/// the limit if that is less) between listeners in proportion to `weights`
/// (each gets at least 1). `limit` None = [`UNLIMITED_BUDGET`].
pub fn share(limit: Option<u64>, reserve: u64, weights: &[u64]) -> Vec<usize> {
    let limit = limit.unwrap_or(UNLIMITED_BUDGET).min(UNLIMITED_BUDGET);
    let budget = limit.saturating_sub(reserve.min(limit / 4));
    let total: u64 = weights.iter().sum::<u64>().max(1);
    weights
        .iter()
        .map(|w| {
            usize::try_from(budget * w / total)
                .unwrap_or(usize::MAX)
                .max(1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_stay_under_the_limit() {
        let caps = share(Some(1024), 256, &[2, 1]);
        assert_eq!(caps, vec![512, 256]);
        assert!(caps.iter().sum::<usize>() <= 1024 - 256);
        // A small limit keeps three quarters for the listeners.
        assert_eq!(share(Some(256), 256, &[2, 1]), vec![128, 64]);
        assert_eq!(share(None, 0, &[1]), vec![65_536]);
    }

    #[test]
    fn reads_the_limit() {
        // Every test process has one, and it is above stdin/out/err.
        if let Some(n) = fd_limit() {
            assert!(n > 3);
        }
    }
}
