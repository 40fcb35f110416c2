//! Device and module twins (service reads and writes, reported patches from
//! devices, the desired-change broadcast) and deployments, which write module
//! twins. `crate::twins` holds the stored form; this is how twins change.

use serde_json::{Map, Value};
use tokio::sync::broadcast;
use verge_core::manifest::Deployment;
use verge_core::{ClientId, DeviceId, ModuleId, Twin};

use super::registry::new_module;
use super::{
    CloudState, DesiredEvent, Inner, MANAGED_BY_EDGE, ModuleEntry, Registry, SYSTEM_MODULES,
    TwinInfo, check_module_id, entry_mut, lock, not_found_device, not_found_module, now,
    to_json_bytes, twin_info,
};
use crate::conn::ConnectionEvent;
use crate::db::module_key;
use crate::error::{CloudError, Result};
use crate::registry::{ConnInfo, ModuleRecord, if_match};
use crate::twins::{StoredTwin, merge_tags, replacement_patch};

impl CloudState {
    /// A device or module twin, with its identity facts.
    pub fn get_twin(&self, client: &ClientId) -> Result<TwinInfo> {
        let reg = lock(&self.inner.reg);
        twin_info(&reg, client)
    }

    /// Service PATCH of a twin: `tags` merged, `properties.desired` merged.
    /// Desired changes are pushed to the connected client and to
    /// [`subscribe_desired`](Self::subscribe_desired) observers.
    pub async fn update_twin(
        &self,
        client: &ClientId,
        body: Value,
        if_match: Option<String>,
    ) -> Result<TwinInfo> {
        let c = client.clone();
        self.blocking(move |i| i.write_twin(&c, &body, if_match.as_deref(), false))
            .await
    }

    /// Service PUT of a twin: `tags` and `properties.desired` replaced. The
    /// device gets the difference as a desired patch (removed keys `null`).
    pub async fn replace_twin(
        &self,
        client: &ClientId,
        body: Value,
        if_match: Option<String>,
    ) -> Result<TwinInfo> {
        let c = client.clone();
        self.blocking(move |i| i.write_twin(&c, &body, if_match.as_deref(), true))
            .await
    }

    /// Device side: merges a reported-properties patch; returns the new
    /// reported `$version`.
    pub async fn patch_reported(&self, client: &ClientId, patch: Value) -> Result<u64> {
        let c = client.clone();
        self.blocking(move |i| i.patch_reported(&c, &patch)).await
    }

    /// Every desired-properties change, for observers besides the connected
    /// client (which gets them on its [`Connection`](crate::Connection)).
    /// Bounded: a receiver that lags gets `RecvError::Lagged` and must re-read
    /// the twins.
    pub fn subscribe_desired(&self) -> broadcast::Receiver<DesiredEvent> {
        self.inner.desired_tx.subscribe()
    }

    // ------------------------------------------------------------ deployments

    /// Applies a deployment (`{"modulesContent": …}`) to an edge device:
    /// validated whole with verge-core's manifest rules (400 naming the
    /// field when invalid), then every listed module twin's desired
    /// properties are replaced in one atomic write, creating missing module
    /// identities (`$edgeAgent`, `$edgeHub`, and others as `managedBy:
    /// IotEdge`). Modules not listed keep their twins. Each module gets the
    /// difference from its previous desired properties as a desired patch,
    /// removed keys as `null` (a device merges patches: the new document
    /// alone would leave removed routes and keys in force).
    pub async fn apply_configuration(&self, device: &str, content: Value) -> Result<()> {
        let d = device.to_owned();
        self.blocking(move |i| i.apply_configuration(&d, &content))
            .await
    }
}

fn twin_key(client: &ClientId) -> Vec<u8> {
    match &client.module {
        None => client.device.as_str().as_bytes().to_vec(),
        Some(m) => module_key(client.device.as_str(), m.as_str()),
    }
}

fn twin_ref<'a>(reg: &'a Registry, client: &ClientId) -> Result<&'a Twin> {
    let dev = client.device.as_str();
    let d = reg.devices.get(dev).ok_or_else(|| not_found_device(dev))?;
    match &client.module {
        None => Ok(&d.twin),
        Some(m) => Ok(&d
            .modules
            .get(m.as_str())
            .ok_or_else(|| not_found_module(dev, m.as_str()))?
            .twin),
    }
}

/// The desired object of a service twin body, without the read-only
/// `$metadata`/`$version` a client may echo back from a GET.
fn desired_of(body: &Value) -> Result<Option<Value>> {
    match body.get("properties").and_then(|p| p.get("desired")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => {
            let mut o = o.clone();
            o.retain(|k, _| k != "$metadata" && k != "$version");
            Ok(Some(Value::Object(o)))
        }
        Some(_) => Err(CloudError::BadRequest(
            "properties.desired must be a JSON object".into(),
        )),
    }
}

impl Inner {
    fn emit_desired(&self, client: &ClientId, patch: Value) {
        self.notify(client, ConnectionEvent::DesiredPatch(patch.clone()));
        // No receivers is normal.
        let _ = self.desired_tx.send(DesiredEvent {
            client: client.clone(),
            patch,
        });
    }

    fn write_twin(
        &self,
        client: &ClientId,
        body: &Value,
        if_match_hdr: Option<&str>,
        replace: bool,
    ) -> Result<TwinInfo> {
        if !body.is_object() {
            return Err(CloudError::BadRequest(
                "the body must be a JSON object (a Twin)".into(),
            ));
        }
        let tags = match body.get("tags") {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) => Some(o.clone()),
            Some(_) => return Err(CloudError::BadRequest("tags must be a JSON object".into())),
        };
        let desired = desired_of(body)?;
        let _writer = lock(&self.writer);
        let reg = lock(&self.reg);
        let twin = twin_ref(&reg, client)?;
        if let Some(h) = if_match_hdr
            && !if_match(h, &twin.etag())
        {
            return Err(CloudError::PreconditionFailed(format!(
                "etag {h} does not match the twin of {client}"
            )));
        }
        let t = now();
        let mut next = twin.clone();
        match (&tags, replace) {
            (Some(tg), false) => next.replace_tags(&merge_tags(&next.tags, tg))?,
            (Some(tg), true) => next.replace_tags(&Value::Object(tg.clone()))?,
            (None, true) => next.replace_tags(&Value::Object(Map::new()))?,
            (None, false) => {}
        }
        let mut event = None;
        match (&desired, replace) {
            (Some(d), false) if d.as_object().is_some_and(|o| !o.is_empty()) => {
                next.patch_desired(d, t)?;
                event = Some(next.desired_patch_message(d));
            }
            (Some(d), true) => {
                let v = next.replace_desired(d, t)?;
                event = Some(replacement_patch(
                    &twin.desired.properties,
                    &next.desired.properties,
                    v,
                ));
            }
            (None, true) => {
                let empty = Value::Object(Map::new());
                let v = next.replace_desired(&empty, t)?;
                event = Some(replacement_patch(
                    &twin.desired.properties,
                    &next.desired.properties,
                    v,
                ));
            }
            _ => {}
        }
        let mut batch = self.db.durable_batch();
        batch.insert(
            &self.db.twins,
            twin_key(client),
            to_json_bytes(&StoredTwin::from(&next))?,
        );
        drop(reg);
        self.commit(batch)?;
        let mut reg = lock(&self.reg);
        *entry_mut(&mut reg, client)?.twin = next;
        let info = twin_info(&reg, client)?;
        drop(reg);
        if let Some(p) = event {
            self.emit_desired(client, p);
        }
        Ok(info)
    }

    fn patch_reported(&self, client: &ClientId, patch: &Value) -> Result<u64> {
        let _writer = lock(&self.writer);
        let mut next = twin_ref(&lock(&self.reg), client)?.clone();
        let v = next.patch_reported(patch, now())?;
        let mut batch = self.db.durable_batch();
        batch.insert(
            &self.db.twins,
            twin_key(client),
            to_json_bytes(&StoredTwin::from(&next))?,
        );
        self.commit(batch)?;
        let mut reg = lock(&self.reg);
        let entry = entry_mut(&mut reg, client)?;
        *entry.twin = next;
        entry.conn.activity_ms = now().as_millis();
        Ok(v)
    }

    fn apply_configuration(&self, device: &str, content: &Value) -> Result<()> {
        Deployment::from_value(content)
            .map_err(|e| CloudError::BadRequest(format!("invalid deployment: {e}")))?;
        let modules = content
            .get("modulesContent")
            .and_then(Value::as_object)
            .ok_or_else(|| CloudError::BadRequest("modulesContent is required".into()))?;
        let _writer = lock(&self.writer);
        let reg = lock(&self.reg);
        let d = reg
            .devices
            .get(device)
            .ok_or_else(|| not_found_device(device))?;
        if !d.rec.iot_edge {
            return Err(CloudError::BadRequest(format!(
                "device {device:?} is not an IoT Edge device (capabilities.iotEdge is false)"
            )));
        }
        let t = now();
        // Records and twins only: connection state is not copied, so a
        // client that connects during the commit stays recorded.
        let mut updated: Vec<(ModuleRecord, Twin)> = Vec::new();
        let mut patches = Vec::new();
        let mut created = Vec::new();
        for (name, section) in modules {
            check_module_id(name)
                .map_err(|e| CloudError::BadRequest(format!("modulesContent.{name}: {e}")))?;
            // Deployment::from_value checked every section has an object here.
            let desired = section
                .get("properties.desired")
                .cloned()
                .unwrap_or_else(|| Value::Object(Map::new()));
            let (rec, mut twin) = match d.modules.get(name) {
                Some(m) => (m.rec.clone(), m.twin.clone()),
                None => {
                    created.push(name.clone());
                    let managed = (!SYSTEM_MODULES.contains(&name.as_str()))
                        .then(|| MANAGED_BY_EDGE.to_owned());
                    let me = new_module(device, name, managed);
                    (me.rec, me.twin)
                }
            };
            let before = twin.desired.properties.clone();
            let version = twin.replace_desired(&desired, t).map_err(|e| {
                CloudError::BadRequest(format!("modulesContent.{name}.properties.desired: {e}"))
            })?;
            // Removed keys go out as nulls: the device merges what it gets.
            patches.push(replacement_patch(
                &before,
                &twin.desired.properties,
                version,
            ));
            updated.push((rec, twin));
        }
        drop(reg);
        let mut batch = self.db.durable_batch();
        for (rec, twin) in &updated {
            let key = module_key(device, &rec.module_id);
            if created.contains(&rec.module_id) {
                batch.insert(&self.db.modules, key.clone(), to_json_bytes(rec)?);
            }
            batch.insert(&self.db.twins, key, to_json_bytes(&StoredTwin::from(twin))?);
        }
        self.commit(batch)?;
        let mut events = Vec::new();
        {
            let mut reg = lock(&self.reg);
            let d = reg
                .devices
                .get_mut(device)
                .ok_or_else(|| not_found_device(device))?;
            for ((rec, twin), patch) in updated.into_iter().zip(patches) {
                let mid = rec.module_id.clone();
                events.push((mid.clone(), patch));
                match d.modules.get_mut(&mid) {
                    Some(m) => {
                        m.rec = rec;
                        m.twin = twin;
                    }
                    None => {
                        d.modules.insert(
                            mid,
                            ModuleEntry {
                                rec,
                                twin,
                                conn: ConnInfo::default(),
                            },
                        );
                    }
                }
            }
        }
        tracing::info!(device, modules = events.len(), created = ?created, "deployment applied");
        for (mid, patch) in events {
            if let (Ok(dv), Ok(m)) = (DeviceId::new(device), ModuleId::new(&mid)) {
                self.emit_desired(&ClientId::module(dv, m), patch);
            }
        }
        Ok(())
    }
}
