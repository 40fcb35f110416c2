//! What the agent reports: each module's `runtimeStatus` and description
//! (from the runtime's state, the restart policy, failed creates and
//! downloads), the deployment's `lastDesiredStatus`, and the reported
//! properties in edgeAgent's shape, written to `reported.json` and handed
//! to the twin link (rate-limited by the reporter).

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{Map, Value, json};
use verge_core::manifest::{DeploymentStatusCode, DesiredStatus, EdgeAgentDesired};
use verge_core::time::Timestamp;
use verge_runtime::{ModuleState, ModuleStatus};

use super::{Agent, REPORTED_FILE, ReconcileOutcome, write_atomic};
use crate::plan::{DesiredModule, needs_update};
use crate::report::desired_fields;
use crate::restart::{Decision, Observed, RestartRecord, RuntimeStatus, decide};

impl Agent {
    pub(super) fn module_statuses(
        &self,
        wanted: &[DesiredModule],
        current: &[ModuleState],
        downloading: &BTreeMap<String, String>,
        now: Timestamp,
    ) -> BTreeMap<String, (RuntimeStatus, String)> {
        let by_name: BTreeMap<&str, &ModuleState> =
            current.iter().map(|s| (s.spec.name.as_str(), s)).collect();
        let default_rec = RestartRecord::default();
        let mut out = BTreeMap::new();
        for m in wanted {
            let blocked = self.blocked.get(&m.name).filter(|b| b.hash == m.hash);
            let pulling = downloading.get(&m.name);
            let entry = match (by_name.get(m.name.as_str()), blocked) {
                (None, _) if pulling.is_some() => (
                    RuntimeStatus::Downloading,
                    pulling.cloned().unwrap_or_default(),
                ),
                (None, Some(b)) if b.given_up(&self.cfg) => {
                    (RuntimeStatus::Failed, b.error.clone())
                }
                (None, Some(b)) => (RuntimeStatus::Backoff, b.error.clone()),
                (None, None) => (RuntimeStatus::Unknown, "not created yet".into()),
                (Some(s), _) => {
                    let obs = Observed::from(*s);
                    let rec = self.restarts.get(&m.name).unwrap_or(&default_rec);
                    let d = if needs_update(s, m) {
                        Decision::Keep(RuntimeStatus::Unknown)
                    } else {
                        decide(m.status, m.policy, &obs, rec, now, &self.cfg)
                    };
                    let mut rs = d.runtime_status(&obs);
                    if rs == RuntimeStatus::Unknown {
                        rs = match s.status {
                            ModuleStatus::Running => RuntimeStatus::Running,
                            ModuleStatus::Stopped => RuntimeStatus::Stopped,
                            ModuleStatus::Failed => RuntimeStatus::Failed,
                            ModuleStatus::Dead => RuntimeStatus::Dead,
                            ModuleStatus::Unknown => RuntimeStatus::Unknown,
                        };
                    }
                    let desc = if let Some(text) = pulling {
                        // An update: the old module keeps its state until
                        // the new image is here.
                        text.clone()
                    } else if let Some(b) = blocked {
                        b.error.clone()
                    } else if d == Decision::GiveUp {
                        format!(
                            "restarted {} times; giving up until the deployment changes",
                            rec.count
                        )
                    } else {
                        match (s.status, s.exit_code) {
                            (ModuleStatus::Running, _) => "running".into(),
                            (st, Some(c)) => format!("{st:?} (exit code {c})").to_lowercase(),
                            (st, None) => format!("{st:?}").to_lowercase(),
                        }
                    };
                    (rs, desc)
                }
            };
            out.insert(m.name.clone(), entry);
        }
        out
    }

    pub(super) fn update_status(
        &mut self,
        wanted: &[DesiredModule],
        statuses: &BTreeMap<String, (RuntimeStatus, String)>,
        outcome: &ReconcileOutcome,
    ) {
        if let Some(r) = &self.refused {
            self.status = r.clone();
            return;
        }
        let mut errors = outcome.errors.clone();
        let mut pending = Vec::new();
        for m in wanted {
            let Some((rs, desc)) = statuses.get(&m.name) else {
                continue;
            };
            if self.blocked.get(&m.name).is_some_and(|b| b.hash == m.hash)
                && !errors
                    .iter()
                    .any(|e| e.starts_with(&format!("{}:", m.name)))
            {
                errors.push(format!("{}: {desc}", m.name));
            }
            let reached = match m.status {
                // Stopped here means it exited 0 and its policy does not restart it:
                // it ran to completion.
                DesiredStatus::Running => {
                    matches!(rs, RuntimeStatus::Running | RuntimeStatus::Stopped)
                }
                DesiredStatus::Stopped => {
                    matches!(rs, RuntimeStatus::Stopped | RuntimeStatus::Failed)
                }
            };
            if m.status == DesiredStatus::Running && *rs == RuntimeStatus::Failed {
                errors.push(format!("{}: {desc}", m.name));
            } else if !reached {
                pending.push(format!("{} ({})", m.name, rs.as_str()));
            }
        }
        self.status = if !errors.is_empty() {
            (DeploymentStatusCode::Failed, errors.join("; "))
        } else if pending.is_empty() || self.reached_ok {
            self.reached_ok = true;
            (DeploymentStatusCode::Ok, String::new())
        } else {
            (
                DeploymentStatusCode::Unknown,
                format!("deployment in progress: {}", pending.join(", ")),
            )
        };
    }

    fn module_entry(
        &self,
        spec: &verge_core::manifest::ModuleSpec,
        state: Option<&ModuleState>,
        status: Option<&(RuntimeStatus, String)>,
    ) -> Value {
        let mut e: Map<String, Value> = desired_fields(spec, false);
        if let Some((rs, desc)) = status {
            e.insert("runtimeStatus".into(), json!(rs.as_str()));
            e.insert("statusDescription".into(), json!(desc));
        }
        if let Some(s) = state {
            e.insert("exitCode".into(), json!(s.exit_code.unwrap_or(0)));
            if let Some(t) = s.started_at {
                e.insert("lastStartTimeUtc".into(), json!(t.to_iso8601()));
            }
            if let Some(t) = s.exited_at {
                e.insert("lastExitTimeUtc".into(), json!(t.to_iso8601()));
            }
            if let (Some(id), Some(Value::Object(settings))) = (&s.image_id, e.get_mut("settings"))
            {
                settings.insert("imageHash".into(), json!(id));
            }
        }
        let rec = self.restarts.get(&spec.name);
        e.insert("restartCount".into(), json!(rec.map_or(0, |r| r.count)));
        if let Some(t) = rec.and_then(|r| r.last_restart) {
            e.insert("lastRestartTimeUtc".into(), json!(t.to_iso8601()));
        }
        Value::Object(e)
    }

    pub(super) async fn publish(
        &mut self,
        desired: Option<&EdgeAgentDesired>,
        current: &[ModuleState],
        statuses: &BTreeMap<String, (RuntimeStatus, String)>,
    ) {
        let by_name: BTreeMap<&str, &ModuleState> =
            current.iter().map(|s| (s.spec.name.as_str(), s)).collect();
        let platform = self.info.as_ref().map_or(
            json!({}),
            |i| json!({"os": i.os_type, "architecture": i.architecture, "version": i.version}),
        );
        let mut runtime = json!({"type": "docker", "platform": platform});
        let mut system = Map::new();
        let mut modules = Map::new();
        if let Some(d) = desired {
            let creds: Map<String, Value> = d
                .runtime
                .registry_credentials
                .iter()
                .map(|(k, c)| {
                    (
                        k.clone(),
                        json!({"address": c.address, "username": c.username}),
                    )
                })
                .collect();
            let mut settings = Map::new();
            if let Some(v) = &d.runtime.min_docker_version {
                settings.insert("minDockerVersion".into(), json!(v));
            }
            if let Some(v) = &d.runtime.logging_options {
                settings.insert("loggingOptions".into(), json!(v));
            }
            settings.insert("registryCredentials".into(), Value::Object(creds));
            if let Some(r) = runtime.as_object_mut() {
                r.insert("settings".into(), Value::Object(settings));
            }
            let mut agent = desired_fields(&d.system_modules.edge_agent, true);
            agent.insert("runtimeStatus".into(), json!("running"));
            agent.insert(
                "lastStartTimeUtc".into(),
                json!(self.started_at.to_iso8601()),
            );
            system.insert("edgeAgent".into(), Value::Object(agent));
            let hub = &d.system_modules.edge_hub;
            system.insert(
                "edgeHub".into(),
                self.module_entry(
                    hub,
                    by_name.get("edgeHub").copied(),
                    statuses.get("edgeHub"),
                ),
            );
            for (name, m) in &d.modules {
                modules.insert(
                    name.clone(),
                    self.module_entry(m, by_name.get(name.as_str()).copied(), statuses.get(name)),
                );
            }
        }
        self.reported = json!({
            "schemaVersion": "1.0",
            "version": {"version": env!("CARGO_PKG_VERSION"), "build": "", "commit": ""},
            "lastDesiredVersion": self.last_desired_version,
            "lastDesiredStatus": {"code": self.status.0.as_u16(), "description": self.status.1},
            "runtime": runtime,
            "systemModules": system,
            "modules": modules,
        });
        if self
            .reporter
            .offer(self.reported.clone(), Instant::now())
            .is_some()
        {
            self.write_reported().await;
        }
    }

    pub(super) async fn write_reported(&self) {
        if let Some(sink) = &self.report_sink {
            sink.send_replace(Some(self.reported.clone()));
        }
        match serde_json::to_vec_pretty(&self.reported) {
            Ok(bytes) => {
                if let Err(e) = write_atomic(&self.storage.join(REPORTED_FILE), &bytes).await {
                    tracing::error!(error = %e, "cannot write reported properties");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot serialise reported properties"),
        }
    }
}
