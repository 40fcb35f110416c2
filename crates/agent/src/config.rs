//! Timings and knobs of the agent.

use std::collections::BTreeMap;
use std::time::Duration;

/// Agent settings. [`AgentConfig::default`] gives Azure's numbers; tests
/// shorten the durations, the logic stays the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Back-off unit: the wait before restart `n` is `base × 2^n` (Azure: 10 s).
    pub backoff_base: Duration,
    /// Upper bound of one back-off wait (Azure: 300 s).
    pub backoff_cap: Duration,
    /// Restarts after which a module is given up and reported `failed` (Azure: 20).
    pub max_restarts: u32,
    /// A module running this long gets its restart count reset (Azure: 10 min).
    pub healthy_reset: Duration,
    /// Interval of the reconcile loop (Azure: 5 s).
    pub reconcile_interval: Duration,
    /// Minimum interval between two reported-properties updates.
    pub report_interval: Duration,
    /// How long a startupOrder tier may take to reach `running` in one reconcile.
    pub tier_timeout: Duration,
    /// SIGTERM → SIGKILL grace when the agent stops a module.
    pub stop_timeout: Duration,
    /// Docker-style image references (`:latest` appended when untagged). Turn
    /// off for the process backend, whose "image" is a command line.
    pub normalize_image: bool,
    /// Extra environment given to every module (after the manifest's `env`).
    pub extra_env: BTreeMap<String, String>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_secs(10),
            backoff_cap: Duration::from_secs(300),
            max_restarts: 20,
            healthy_reset: Duration::from_secs(600),
            reconcile_interval: Duration::from_secs(5),
            report_interval: Duration::from_secs(5),
            tier_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(10),
            normalize_image: true,
            extra_env: BTreeMap::new(),
        }
    }
}
