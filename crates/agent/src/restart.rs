//! The restart state machine: restart policy × runtime state × restart count →
//! what to do, and the back-off schedule.
//!
//! A module desired `running` that is not running (or, with `on-unhealthy` /
//! `always`, runs but is unhealthy) is restarted once its cool-off
//! `min(base × 2^count, cap)` has elapsed since it exited (since its last
//! restart for an unhealthy module); until then it is in `backoff`. After
//! `max_restarts` restarts it is `failed` and left alone until a deployment
//! touches it. A module running for `healthy_reset` gets its count reset.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use verge_core::manifest::{DesiredStatus, RestartPolicy};
use verge_core::time::Timestamp;
use verge_runtime::{Health, ModuleState, ModuleStatus};

use crate::config::AgentConfig;

/// The wait before restart number `n + 1` (n restarts done so far):
/// `min(base × 2^n, cap)`.
pub fn cool_off(n: u32, base: Duration, cap: Duration) -> Duration {
    base.saturating_mul(2u32.saturating_pow(n)).min(cap)
}

/// What the agent remembers per module across reconciles (and agent restarts).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartRecord {
    /// Restarts done by the restart policy since the last reset.
    pub count: u32,
    /// When the last policy restart happened.
    pub last_restart: Option<Timestamp>,
    /// The agent stopped this module because the manifest said `stopped`; a
    /// later `running` starts it at once, with no back-off.
    pub stopped_by_agent: bool,
}

/// `runtimeStatus` as reported (reference §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeStatus {
    /// Running (and not unhealthy).
    Running,
    /// Waiting for its next restart.
    Backoff,
    /// Running, healthcheck failing.
    Unhealthy,
    /// Not running, and not to be restarted.
    Stopped,
    /// Exited with an error and not restarted, or given up.
    Failed,
    /// Dead (Docker).
    Dead,
    /// Not created yet: its image is downloading.
    Downloading,
    /// Unknown.
    Unknown,
}

impl RuntimeStatus {
    /// The reported spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Backoff => "backoff",
            Self::Unhealthy => "unhealthy",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Downloading => "downloading",
            Self::Unknown => "unknown",
        }
    }
}

/// The observed facts the decision needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Runtime status.
    pub status: ModuleStatus,
    /// Healthcheck result.
    pub health: Option<Health>,
    /// Last start.
    pub started_at: Option<Timestamp>,
    /// Last exit.
    pub exited_at: Option<Timestamp>,
}

impl From<&ModuleState> for Observed {
    fn from(s: &ModuleState) -> Self {
        Self {
            status: s.status,
            health: s.health,
            started_at: s.started_at,
            exited_at: s.exited_at,
        }
    }
}

/// What to do with one existing, up-to-date module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing; report this status.
    Keep(RuntimeStatus),
    /// Start it (never started, or desired status changed back to running);
    /// not a policy restart.
    Start,
    /// Stop it (desired `stopped`).
    Stop,
    /// Policy restart now (stop first if `was_running`); counts.
    Restart {
        /// The module runs (unhealthy) and must be stopped first.
        was_running: bool,
    },
    /// Policy restart pending.
    Backoff {
        /// Time left until the restart.
        remaining: Duration,
    },
    /// `max_restarts` reached: reported `failed`, not restarted.
    GiveUp,
}

impl Decision {
    /// The runtimeStatus to report for a module in this situation.
    pub fn runtime_status(self, obs: &Observed) -> RuntimeStatus {
        match self {
            Self::Keep(s) => s,
            Self::Start => RuntimeStatus::Stopped,
            Self::Stop => RuntimeStatus::Running,
            Self::Restart { .. } | Self::Backoff { .. } => {
                if obs.status == ModuleStatus::Running {
                    RuntimeStatus::Unhealthy
                } else {
                    RuntimeStatus::Backoff
                }
            }
            Self::GiveUp => RuntimeStatus::Failed,
        }
    }
}

fn elapsed(now: Timestamp, since: Timestamp) -> Option<Duration> {
    let ms = now.as_millis().checked_sub(since.as_millis())?;
    u64::try_from(ms).ok().map(Duration::from_millis)
}

fn status_of(s: ModuleStatus) -> RuntimeStatus {
    match s {
        ModuleStatus::Running => RuntimeStatus::Running,
        ModuleStatus::Stopped => RuntimeStatus::Stopped,
        ModuleStatus::Failed => RuntimeStatus::Failed,
        ModuleStatus::Dead => RuntimeStatus::Dead,
        ModuleStatus::Unknown => RuntimeStatus::Unknown,
    }
}

/// The decision table: desired status × restart policy × runtime state ×
/// health × restart count (see the module docs).
pub fn decide(
    desired: DesiredStatus,
    policy: RestartPolicy,
    obs: &Observed,
    rec: &RestartRecord,
    now: Timestamp,
    cfg: &AgentConfig,
) -> Decision {
    if desired == DesiredStatus::Stopped {
        return if obs.status == ModuleStatus::Running {
            Decision::Stop
        } else {
            Decision::Keep(RuntimeStatus::Stopped)
        };
    }
    match obs.status {
        ModuleStatus::Running => {
            if obs.health != Some(Health::Unhealthy) {
                return Decision::Keep(RuntimeStatus::Running);
            }
            if matches!(policy, RestartPolicy::OnUnhealthy | RestartPolicy::Always) {
                policy_restart(rec, rec.last_restart.or(obs.started_at), true, now, cfg)
            } else {
                Decision::Keep(RuntimeStatus::Unhealthy)
            }
        }
        ModuleStatus::Dead => Decision::Keep(RuntimeStatus::Dead),
        ModuleStatus::Stopped | ModuleStatus::Failed | ModuleStatus::Unknown => {
            if obs.started_at.is_none() || rec.stopped_by_agent {
                return Decision::Start;
            }
            let applies = match policy {
                RestartPolicy::Never => false,
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure | RestartPolicy::OnUnhealthy => {
                    obs.status == ModuleStatus::Failed
                }
            };
            if applies {
                policy_restart(rec, obs.exited_at.or(rec.last_restart), false, now, cfg)
            } else {
                Decision::Keep(status_of(obs.status))
            }
        }
    }
}

fn policy_restart(
    rec: &RestartRecord,
    since: Option<Timestamp>,
    was_running: bool,
    now: Timestamp,
    cfg: &AgentConfig,
) -> Decision {
    if rec.count >= cfg.max_restarts {
        return Decision::GiveUp;
    }
    let wait = cool_off(rec.count, cfg.backoff_base, cfg.backoff_cap);
    match since.and_then(|s| elapsed(now, s)) {
        // Unknown exit time or a clock that went backwards: restart at once.
        None => Decision::Restart { was_running },
        Some(e) if e.is_zero() || e >= wait => Decision::Restart { was_running },
        Some(e) => Decision::Backoff {
            remaining: wait.saturating_sub(e),
        },
    }
}

/// Whether a module has run long enough for its restart count to be reset.
pub fn should_reset(
    obs: &Observed,
    rec: &RestartRecord,
    now: Timestamp,
    cfg: &AgentConfig,
) -> bool {
    rec.count > 0
        && obs.status == ModuleStatus::Running
        && obs.health != Some(Health::Unhealthy)
        && obs
            .started_at
            .and_then(|s| elapsed(now, s))
            .is_some_and(|e| e >= cfg.healthy_reset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn backoff_schedule_matches_azure() {
        let waits: Vec<u64> = (0..8)
            .map(|n| cool_off(n, secs(10), secs(300)).as_secs())
            .collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(cool_off(1000, secs(10), secs(300)), secs(300));
        assert_eq!(
            cool_off(3, Duration::from_millis(50), Duration::from_millis(300)),
            Duration::from_millis(300)
        );
        assert_eq!(cool_off(4, Duration::ZERO, secs(300)), Duration::ZERO);
    }

    const T0: i64 = 1_800_000_000_000;

    fn at(offset_s: i64) -> Timestamp {
        Timestamp::from_millis(T0 + offset_s * 1000)
    }

    fn obs(status: ModuleStatus, health: Option<Health>, exited: Option<i64>) -> Observed {
        Observed {
            status,
            health,
            started_at: Some(at(-100)),
            exited_at: exited.map(at),
        }
    }

    fn rec(count: u32) -> RestartRecord {
        RestartRecord {
            count,
            last_restart: Some(at(-50)),
            stopped_by_agent: false,
        }
    }

    #[test]
    fn decision_table() {
        use DesiredStatus::{Running as DR, Stopped as DS};
        use ModuleStatus::{Dead, Failed, Running, Stopped};
        use RestartPolicy::{Always, Never, OnFailure, OnUnhealthy};
        let cfg = AgentConfig::default(); // 10 s × 2^n, cap 300 s, max 20
        let unh = Some(Health::Unhealthy);
        let ok = Some(Health::Healthy);
        let now = at(0);
        let restart = Decision::Restart { was_running: false };
        let restart_running = Decision::Restart { was_running: true };
        let keep = Decision::Keep;
        // (desired, policy, observed, restart count, expected)
        let table: Vec<(DesiredStatus, RestartPolicy, Observed, u32, Decision)> = vec![
            // desired stopped: stop a running module whatever the policy, else nothing
            (DS, Always, obs(Running, None, None), 0, Decision::Stop),
            (DS, Never, obs(Running, unh, None), 0, Decision::Stop),
            (
                DS,
                Always,
                obs(Failed, None, Some(-60)),
                0,
                keep(RuntimeStatus::Stopped),
            ),
            (
                DS,
                OnFailure,
                obs(Stopped, None, Some(-60)),
                25,
                keep(RuntimeStatus::Stopped),
            ),
            // running and healthy: nothing
            (
                DR,
                Always,
                obs(Running, ok, None),
                3,
                keep(RuntimeStatus::Running),
            ),
            (
                DR,
                Never,
                obs(Running, None, None),
                0,
                keep(RuntimeStatus::Running),
            ),
            // running but unhealthy: only on-unhealthy and always restart
            (
                DR,
                Never,
                obs(Running, unh, None),
                0,
                keep(RuntimeStatus::Unhealthy),
            ),
            (
                DR,
                OnFailure,
                obs(Running, unh, None),
                0,
                keep(RuntimeStatus::Unhealthy),
            ),
            (DR, OnUnhealthy, obs(Running, unh, None), 0, restart_running),
            (DR, Always, obs(Running, unh, None), 0, restart_running),
            (
                DR,
                OnUnhealthy,
                obs(Running, unh, None),
                20,
                Decision::GiveUp,
            ),
            // exited 0 (stopped)
            (
                DR,
                Never,
                obs(Stopped, None, Some(-60)),
                0,
                keep(RuntimeStatus::Stopped),
            ),
            (
                DR,
                OnFailure,
                obs(Stopped, None, Some(-60)),
                0,
                keep(RuntimeStatus::Stopped),
            ),
            (
                DR,
                OnUnhealthy,
                obs(Stopped, None, Some(-60)),
                0,
                keep(RuntimeStatus::Stopped),
            ),
            (DR, Always, obs(Stopped, None, Some(-60)), 0, restart),
            // exited non-zero (failed)
            (
                DR,
                Never,
                obs(Failed, None, Some(-60)),
                0,
                keep(RuntimeStatus::Failed),
            ),
            (DR, OnFailure, obs(Failed, None, Some(-60)), 0, restart),
            (DR, OnUnhealthy, obs(Failed, None, Some(-60)), 0, restart),
            (DR, Always, obs(Failed, None, Some(-60)), 0, restart),
            // back-off: count 2 → wait 40 s since the exit
            (
                DR,
                Always,
                obs(Failed, None, Some(-39)),
                2,
                Decision::Backoff { remaining: secs(1) },
            ),
            (DR, Always, obs(Failed, None, Some(-40)), 2, restart),
            // cap: count 9 → 300 s
            (
                DR,
                Always,
                obs(Failed, None, Some(-299)),
                9,
                Decision::Backoff { remaining: secs(1) },
            ),
            (DR, Always, obs(Failed, None, Some(-300)), 9, restart),
            // clock skew (exit in the future): at once
            (DR, Always, obs(Failed, None, Some(5)), 4, restart),
            // given up at max_restarts
            (DR, Always, obs(Failed, None, Some(-1000)), 19, restart),
            (
                DR,
                Always,
                obs(Failed, None, Some(-1000)),
                20,
                Decision::GiveUp,
            ),
            (
                DR,
                OnFailure,
                obs(Failed, None, Some(-1000)),
                21,
                Decision::GiveUp,
            ),
            // dead: left to the planner (recreate)
            (
                DR,
                Always,
                obs(Dead, None, Some(-1)),
                0,
                keep(RuntimeStatus::Dead),
            ),
        ];
        for (i, (desired, policy, o, count, expected)) in table.into_iter().enumerate() {
            let got = decide(desired, policy, &o, &rec(count), now, &cfg);
            assert_eq!(
                got, expected,
                "row {i}: {desired:?} {policy:?} {o:?} count {count}"
            );
        }
    }

    #[test]
    fn never_started_and_agent_stopped_modules_start_at_once() {
        let cfg = AgentConfig::default();
        let fresh = Observed {
            status: ModuleStatus::Stopped,
            health: None,
            started_at: None,
            exited_at: None,
        };
        for policy in [
            RestartPolicy::Never,
            RestartPolicy::OnFailure,
            RestartPolicy::OnUnhealthy,
            RestartPolicy::Always,
        ] {
            let d = decide(DesiredStatus::Running, policy, &fresh, &rec(0), at(0), &cfg);
            assert_eq!(d, Decision::Start);
            let stopped = RestartRecord {
                stopped_by_agent: true,
                ..RestartRecord::default()
            };
            let o = obs(ModuleStatus::Failed, None, Some(-1));
            let d = decide(DesiredStatus::Running, policy, &o, &stopped, at(0), &cfg);
            assert_eq!(d, Decision::Start);
        }
    }

    #[test]
    fn unhealthy_backoff_counts_from_last_restart() {
        let cfg = AgentConfig::default();
        let o = obs(ModuleStatus::Running, Some(Health::Unhealthy), None);
        let r = RestartRecord {
            count: 1,
            last_restart: Some(at(-5)),
            stopped_by_agent: false,
        };
        let d = decide(
            DesiredStatus::Running,
            RestartPolicy::OnUnhealthy,
            &o,
            &r,
            at(0),
            &cfg,
        );
        assert_eq!(
            d,
            Decision::Backoff {
                remaining: secs(15)
            }
        );
        assert_eq!(d.runtime_status(&o), RuntimeStatus::Unhealthy);
    }

    /// A module crashing at once after every start, driven by a test clock
    /// with Azure's defaults: restarts come 10, 20, 40, 80, 160 s after the
    /// exits, then every 300 s; after 20 restarts it is given up. A module
    /// that then runs 10 minutes gets its count reset.
    #[test]
    fn crash_loop_with_a_test_clock() {
        let cfg = AgentConfig::default();
        let mut rec = RestartRecord::default();
        let mut now = at(0);
        let mut waits = Vec::new();
        loop {
            // It exits right now.
            let o = obs(ModuleStatus::Failed, None, None);
            let o = Observed {
                exited_at: Some(now),
                started_at: Some(now),
                ..o
            };
            let exited = now;
            // Advance one second at a time until the decision is to restart
            // (an elapsed time of zero counts as clock skew: restart at once).
            now = Timestamp::from_millis(now.as_millis() + 1000);
            let d = loop {
                match decide(
                    DesiredStatus::Running,
                    RestartPolicy::Always,
                    &o,
                    &rec,
                    now,
                    &cfg,
                ) {
                    Decision::Backoff { remaining } => {
                        assert!(remaining > Duration::ZERO);
                        now = Timestamp::from_millis(now.as_millis() + 1000);
                    }
                    d => break d,
                }
            };
            if d == Decision::GiveUp {
                break;
            }
            assert_eq!(d, Decision::Restart { was_running: false });
            waits.push((now.as_millis() - exited.as_millis()) / 1000);
            rec.count += 1;
            rec.last_restart = Some(now);
        }
        let mut expected = vec![10, 20, 40, 80, 160];
        expected.resize(20, 300);
        assert_eq!(waits, expected);
        assert_eq!(rec.count, cfg.max_restarts);
        // Given up: stays so, however long it waits.
        let o = obs(ModuleStatus::Failed, None, Some(-100_000));
        let later = Timestamp::from_millis(now.as_millis() + 86_400_000);
        assert_eq!(
            decide(
                DesiredStatus::Running,
                RestartPolicy::Always,
                &o,
                &rec,
                later,
                &cfg
            ),
            Decision::GiveUp
        );
        // Running for 10 minutes resets the count (and with it the back-off).
        let running = Observed {
            status: ModuleStatus::Running,
            health: None,
            started_at: Some(now),
            exited_at: None,
        };
        let t = |s: i64| Timestamp::from_millis(now.as_millis() + s * 1000);
        assert!(!should_reset(&running, &rec, t(599), &cfg));
        assert!(should_reset(&running, &rec, t(600), &cfg));
    }

    #[test]
    fn reset_after_healthy_period() {
        let cfg = AgentConfig::default();
        let mut o = obs(ModuleStatus::Running, None, None);
        o.started_at = Some(at(-600));
        assert!(should_reset(&o, &rec(3), at(0), &cfg));
        o.started_at = Some(at(-599));
        assert!(!should_reset(&o, &rec(3), at(0), &cfg));
        o.started_at = Some(at(-601));
        assert!(!should_reset(&o, &rec(0), at(0), &cfg));
        o.health = Some(Health::Unhealthy);
        assert!(!should_reset(&o, &rec(3), at(0), &cfg));
        let f = obs(ModuleStatus::Failed, None, Some(-700));
        assert!(!should_reset(&f, &rec(3), at(0), &cfg));
    }
}
