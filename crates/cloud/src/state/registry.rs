//! The device and module registry: create, read, update and delete
//! identities, with etags, edge device scopes and parent/child links.
//! `crate::registry` holds the records; this is how they are written.

use std::collections::BTreeMap;

use verge_core::Twin;

use super::{
    CloudState, DeviceEntry, DeviceInfo, Inner, ModuleEntry, ModuleInfo, Registry, SYSTEM_MODULES,
    check_device_id, check_module_id, lock, not_found_device, not_found_module, now, to_json_bytes,
};
use crate::db::{c2d_key, module_key};
use crate::error::{CloudError, Result};
use crate::registry::{
    ConnInfo, DeviceRecord, DeviceSpec, DeviceStatus, ModuleRecord, ModuleSpec, SymmetricKeys,
    if_match, is_wildcard, new_generation_id,
};
use crate::twins::StoredTwin;

impl CloudState {
    /// Creates or updates a device (PUT `/devices/{id}`). Without `if_match`
    /// an existing device is a 409; with it, the etag must match (412).
    /// Returns the device and whether it was created.
    pub async fn put_device(
        &self,
        id: &str,
        spec: DeviceSpec,
        if_match: Option<String>,
    ) -> Result<(DeviceInfo, bool)> {
        let id = id.to_owned();
        self.blocking(move |i| i.put_device(&id, spec, if_match.as_deref()))
            .await
    }

    /// One device.
    pub fn get_device(&self, id: &str) -> Result<DeviceInfo> {
        let reg = lock(&self.inner.reg);
        let d = reg.devices.get(id).ok_or_else(|| not_found_device(id))?;
        Ok(DeviceInfo {
            record: d.rec.clone(),
            conn: d.conn.clone(),
        })
    }

    /// Devices in id order, at most `top`.
    pub fn list_devices(&self, top: Option<usize>) -> Vec<DeviceInfo> {
        let reg = lock(&self.inner.reg);
        reg.devices
            .values()
            .take(top.unwrap_or(usize::MAX))
            .map(|d| DeviceInfo {
                record: d.rec.clone(),
                conn: d.conn.clone(),
            })
            .collect()
    }

    /// Deletes a device with its modules, twins and C2D queue. Children of
    /// an edge device lose their parent.
    pub async fn delete_device(&self, id: &str, if_match: Option<String>) -> Result<()> {
        let id = id.to_owned();
        self.blocking(move |i| i.delete_device(&id, if_match.as_deref()))
            .await
    }

    /// Creates or updates a module identity (same etag rules as devices).
    pub async fn put_module(
        &self,
        device: &str,
        module: &str,
        spec: ModuleSpec,
        if_match: Option<String>,
    ) -> Result<(ModuleInfo, bool)> {
        let (d, m) = (device.to_owned(), module.to_owned());
        self.blocking(move |i| i.put_module(&d, &m, spec, if_match.as_deref()))
            .await
    }

    /// One module.
    pub fn get_module(&self, device: &str, module: &str) -> Result<ModuleInfo> {
        let reg = lock(&self.inner.reg);
        let d = reg
            .devices
            .get(device)
            .ok_or_else(|| not_found_device(device))?;
        let m = d
            .modules
            .get(module)
            .ok_or_else(|| not_found_module(device, module))?;
        Ok(ModuleInfo {
            record: m.rec.clone(),
            conn: m.conn.clone(),
        })
    }

    /// The modules of a device.
    pub fn list_modules(&self, device: &str) -> Result<Vec<ModuleInfo>> {
        let reg = lock(&self.inner.reg);
        let d = reg
            .devices
            .get(device)
            .ok_or_else(|| not_found_device(device))?;
        Ok(d.modules
            .values()
            .map(|m| ModuleInfo {
                record: m.rec.clone(),
                conn: m.conn.clone(),
            })
            .collect())
    }

    /// The device scope of edge device `edge` (reference §11): the devices
    /// whose parent is `edge`, and `edge`'s own modules. Empty lists when
    /// `edge` is not an edge device; `NotFound` when it is not registered.
    pub fn device_scope(&self, edge: &str) -> Result<(Vec<DeviceInfo>, Vec<ModuleInfo>)> {
        let reg = lock(&self.inner.reg);
        let e = reg
            .devices
            .get(edge)
            .ok_or_else(|| not_found_device(edge))?;
        let Some(own) = e.rec.device_scope.as_ref().filter(|_| e.rec.iot_edge) else {
            return Ok((Vec::new(), Vec::new()));
        };
        let children = reg
            .devices
            .values()
            .filter(|d| d.rec.device_id != edge && d.rec.parent_scopes.first() == Some(own))
            .map(|d| DeviceInfo {
                record: d.rec.clone(),
                conn: d.conn.clone(),
            })
            .collect();
        let modules = e
            .modules
            .values()
            .map(|m| ModuleInfo {
                record: m.rec.clone(),
                conn: m.conn.clone(),
            })
            .collect();
        Ok((children, modules))
    }

    /// Deletes a module identity and its twin.
    pub async fn delete_module(
        &self,
        device: &str,
        module: &str,
        if_match: Option<String>,
    ) -> Result<()> {
        let (d, m) = (device.to_owned(), module.to_owned());
        self.blocking(move |i| i.delete_module(&d, &m, if_match.as_deref()))
            .await
    }
}

pub(super) fn new_module(device: &str, module: &str, managed_by: Option<String>) -> ModuleEntry {
    ModuleEntry {
        rec: ModuleRecord {
            device_id: device.to_owned(),
            module_id: module.to_owned(),
            generation_id: new_generation_id(),
            etag_version: 1,
            managed_by,
            keys: SymmetricKeys::generate(),
        },
        twin: Twin::new(device, Some(module.to_owned())),
        conn: ConnInfo::default(),
    }
}

impl Inner {
    fn resolve_scopes(
        &self,
        reg: &Registry,
        id: &str,
        spec: &DeviceSpec,
        existing: Option<&DeviceRecord>,
        generation_id: &str,
    ) -> Result<(Option<String>, Vec<String>)> {
        if spec.parent_scopes.len() > 1 {
            return Err(CloudError::BadRequest(format!(
                "a device can have at most one parent; parentScopes has {} entries",
                spec.parent_scopes.len()
            )));
        }
        let (own, parent) = if spec.iot_edge {
            let own = existing
                .filter(|e| e.iot_edge)
                .and_then(|e| e.device_scope.clone())
                .unwrap_or_else(|| DeviceRecord::edge_scope(id, generation_id));
            if let Some(s) = &spec.device_scope
                && s != &own
            {
                return Err(CloudError::BadRequest(format!(
                    "deviceScope of edge device {id:?} is generated ({own}); give it a parent with parentScopes"
                )));
            }
            (Some(own), spec.parent_scopes.first().cloned())
        } else {
            let parent = match (&spec.device_scope, spec.parent_scopes.first()) {
                (Some(d), Some(p)) if d != p => {
                    return Err(CloudError::BadRequest(format!(
                        "deviceScope {d:?} and parentScopes[0] {p:?} of a leaf device must name the same parent"
                    )));
                }
                (d, p) => d.clone().or_else(|| p.cloned()),
            };
            (parent.clone(), None)
        };
        let parent_scope = if spec.iot_edge { parent } else { own.clone() };
        if let Some(p) = &parent_scope {
            let pid = reg.scopes.get(p).ok_or_else(|| {
                CloudError::BadRequest(format!("parent scope {p:?} names no edge device"))
            })?;
            if pid == id {
                return Err(CloudError::BadRequest(format!(
                    "device {id:?} cannot be its own parent"
                )));
            }
            // Walk up the chain: reaching `id` again would make a cycle.
            let mut cur = pid.clone();
            for _ in 0..=reg.devices.len() {
                let Some(next) = reg
                    .devices
                    .get(&cur)
                    .and_then(|d| d.rec.parent_scopes.first())
                    .and_then(|s| reg.scopes.get(s))
                else {
                    break;
                };
                if next == id {
                    return Err(CloudError::BadRequest(format!(
                        "making {pid:?} the parent of {id:?} would create a cycle"
                    )));
                }
                cur = next.clone();
            }
        }
        Ok((own, parent_scope.into_iter().collect()))
    }

    fn put_device(
        &self,
        id: &str,
        spec: DeviceSpec,
        if_match_hdr: Option<&str>,
    ) -> Result<(DeviceInfo, bool)> {
        check_device_id(id)?;
        let _writer = lock(&self.writer);
        let reg = lock(&self.reg);
        let t = now().as_millis();
        let existing = reg.devices.get(id).map(|d| d.rec.clone());
        match (&existing, if_match_hdr) {
            (Some(_), None) => {
                return Err(CloudError::Conflict(format!(
                    "device {id:?} already exists (send If-Match to update it)"
                )));
            }
            (Some(e), Some(h)) if !if_match(h, &e.etag()) => {
                return Err(CloudError::PreconditionFailed(format!(
                    "etag {h} does not match device {id:?}"
                )));
            }
            (None, Some(h)) if !is_wildcard(h) => return Err(not_found_device(id)),
            _ => {}
        }
        let generation_id = existing
            .as_ref()
            .map_or_else(new_generation_id, |e| e.generation_id.clone());
        let (device_scope, parent_scopes) =
            self.resolve_scopes(&reg, id, &spec, existing.as_ref(), &generation_id)?;
        if let Some(e) = &existing
            && e.iot_edge
            && !spec.iot_edge
            && let Some(own) = &e.device_scope
            && reg
                .devices
                .values()
                .any(|d| d.rec.parent_scopes.first() == Some(own))
        {
            return Err(CloudError::BadRequest(format!(
                "device {id:?} has children; it must stay an edge device"
            )));
        }
        let status = spec.status.unwrap_or(DeviceStatus::Enabled);
        let rec = DeviceRecord {
            device_id: id.to_owned(),
            generation_id,
            etag_version: existing.as_ref().map_or(1, |e| e.etag_version + 1),
            status,
            status_reason: spec.status_reason,
            status_updated_ms: match &existing {
                Some(e) if e.status == status => e.status_updated_ms,
                _ => t,
            },
            keys: spec
                .keys
                .or_else(|| existing.as_ref().map(|e| e.keys.clone()))
                .unwrap_or_else(SymmetricKeys::generate),
            iot_edge: spec.iot_edge,
            device_scope,
            parent_scopes,
            x509: match (spec.x509, spec.sas_given) {
                (Some(x), _) => Some(x),
                (None, true) => None,
                // `authentication` not given (or without a type): unchanged.
                (None, false) => existing.as_ref().and_then(|e| e.x509.clone()),
            },
        };
        let mut batch = self.db.durable_batch();
        batch.insert(&self.db.devices, id.as_bytes(), to_json_bytes(&rec)?);
        let mut new_modules = Vec::new();
        let twin = match reg.devices.get(id) {
            Some(d) => d.twin.clone(),
            None => Twin::new(id, None),
        };
        if existing.is_none() {
            batch.insert(
                &self.db.twins,
                id.as_bytes(),
                to_json_bytes(&StoredTwin::from(&twin))?,
            );
        }
        if rec.iot_edge {
            for m in SYSTEM_MODULES {
                let have = reg
                    .devices
                    .get(id)
                    .is_some_and(|d| d.modules.contains_key(m));
                if !have {
                    let me = new_module(id, m, None);
                    batch.insert(&self.db.modules, module_key(id, m), to_json_bytes(&me.rec)?);
                    batch.insert(
                        &self.db.twins,
                        module_key(id, m),
                        to_json_bytes(&StoredTwin::from(&me.twin))?,
                    );
                    new_modules.push(me);
                }
            }
        }
        drop(reg);
        self.commit(batch)?;
        // Disk has it; now memory (the writer lock kept it as read).
        let mut reg = lock(&self.reg);
        if let Some(e) = &existing
            && e.iot_edge
            && let Some(s) = &e.device_scope
        {
            reg.scopes.remove(s);
        }
        if rec.iot_edge
            && let Some(s) = &rec.device_scope
        {
            reg.scopes.insert(s.clone(), id.to_owned());
        }
        let entry = reg
            .devices
            .entry(id.to_owned())
            .or_insert_with(|| DeviceEntry {
                rec: rec.clone(),
                twin,
                conn: ConnInfo::default(),
                modules: BTreeMap::new(),
            });
        entry.rec = rec.clone();
        for me in new_modules {
            entry.modules.insert(me.rec.module_id.clone(), me);
        }
        let info = DeviceInfo {
            record: rec,
            conn: entry.conn.clone(),
        };
        drop(reg);
        if info.record.status == DeviceStatus::Disabled {
            self.kick(id);
        }
        Ok((info, existing.is_none()))
    }

    fn delete_device(&self, id: &str, if_match_hdr: Option<&str>) -> Result<()> {
        let _writer = lock(&self.writer);
        let reg = lock(&self.reg);
        let d = reg.devices.get(id).ok_or_else(|| not_found_device(id))?;
        if let Some(h) = if_match_hdr
            && !if_match(h, &d.rec.etag())
        {
            return Err(CloudError::PreconditionFailed(format!(
                "etag {h} does not match device {id:?}"
            )));
        }
        let own_scope = d.rec.device_scope.clone().filter(|_| d.rec.iot_edge);
        let mut batch = self.db.durable_batch();
        batch.remove(&self.db.devices, id.as_bytes());
        batch.remove(&self.db.twins, id.as_bytes());
        for m in d.modules.keys() {
            batch.remove(&self.db.modules, module_key(id, m));
            batch.remove(&self.db.twins, module_key(id, m));
        }
        // Children lose their parent in the same write.
        let mut orphans = Vec::new();
        if let Some(own) = &own_scope {
            for (cid, c) in &reg.devices {
                if cid != id && c.rec.parent_scopes.first() == Some(own) {
                    let mut r = c.rec.clone();
                    r.parent_scopes.clear();
                    if !r.iot_edge {
                        r.device_scope = None;
                    }
                    r.etag_version += 1;
                    batch.insert(&self.db.devices, cid.as_bytes(), to_json_bytes(&r)?);
                    orphans.push(r);
                }
            }
        }
        if let Some(q) = lock(&self.c2d).queues.get(id) {
            for m in q {
                batch.remove(&self.db.c2d, c2d_key(id, m.seq));
            }
        }
        drop(reg);
        self.commit(batch)?;
        let mut reg = lock(&self.reg);
        lock(&self.c2d).queues.remove(id);
        reg.devices.remove(id);
        if let Some(s) = own_scope {
            reg.scopes.remove(&s);
        }
        for r in orphans {
            if let Some(c) = reg.devices.get_mut(&r.device_id) {
                c.rec = r;
            }
        }
        drop(reg);
        self.kick(id);
        Ok(())
    }

    fn put_module(
        &self,
        device: &str,
        module: &str,
        spec: ModuleSpec,
        if_match_hdr: Option<&str>,
    ) -> Result<(ModuleInfo, bool)> {
        check_module_id(module)?;
        let _writer = lock(&self.writer);
        let existing = {
            let reg = lock(&self.reg);
            let d = reg
                .devices
                .get(device)
                .ok_or_else(|| not_found_device(device))?;
            d.modules.get(module).map(|m| m.rec.clone())
        };
        match (&existing, if_match_hdr) {
            (Some(_), None) => {
                return Err(CloudError::Conflict(format!(
                    "module {module:?} of device {device:?} already exists (send If-Match to update it)"
                )));
            }
            (Some(e), Some(h)) if !if_match(h, &e.etag()) => {
                return Err(CloudError::PreconditionFailed(format!(
                    "etag {h} does not match module {module:?} of device {device:?}"
                )));
            }
            (None, Some(h)) if !is_wildcard(h) => return Err(not_found_module(device, module)),
            _ => {}
        }
        let rec = ModuleRecord {
            device_id: device.to_owned(),
            module_id: module.to_owned(),
            generation_id: existing
                .as_ref()
                .map_or_else(new_generation_id, |e| e.generation_id.clone()),
            etag_version: existing.as_ref().map_or(1, |e| e.etag_version + 1),
            managed_by: spec.managed_by,
            keys: spec
                .keys
                .or_else(|| existing.as_ref().map(|e| e.keys.clone()))
                .unwrap_or_else(SymmetricKeys::generate),
        };
        let key = module_key(device, module);
        let mut batch = self.db.durable_batch();
        batch.insert(&self.db.modules, key.clone(), to_json_bytes(&rec)?);
        let twin = Twin::new(device, Some(module.to_owned()));
        if existing.is_none() {
            batch.insert(
                &self.db.twins,
                key,
                to_json_bytes(&StoredTwin::from(&twin))?,
            );
        }
        self.commit(batch)?;
        let mut reg = lock(&self.reg);
        let d = reg
            .devices
            .get_mut(device)
            .ok_or_else(|| not_found_device(device))?;
        let entry = d.modules.entry(module.to_owned()).or_insert(ModuleEntry {
            rec: rec.clone(),
            twin,
            conn: ConnInfo::default(),
        });
        entry.rec = rec.clone();
        Ok((
            ModuleInfo {
                record: rec,
                conn: entry.conn.clone(),
            },
            existing.is_none(),
        ))
    }

    fn delete_module(&self, device: &str, module: &str, if_match_hdr: Option<&str>) -> Result<()> {
        let _writer = lock(&self.writer);
        {
            let reg = lock(&self.reg);
            let m = reg
                .devices
                .get(device)
                .ok_or_else(|| not_found_device(device))?
                .modules
                .get(module)
                .ok_or_else(|| not_found_module(device, module))?;
            if let Some(h) = if_match_hdr
                && !if_match(h, &m.rec.etag())
            {
                return Err(CloudError::PreconditionFailed(format!(
                    "etag {h} does not match module {module:?} of device {device:?}"
                )));
            }
        }
        let mut batch = self.db.durable_batch();
        batch.remove(&self.db.modules, module_key(device, module));
        batch.remove(&self.db.twins, module_key(device, module));
        self.commit(batch)?;
        if let Some(d) = lock(&self.reg).devices.get_mut(device) {
            d.modules.remove(module);
        }
        lock(&self.conns).map.retain(|c, _| {
            !(c.device.as_str() == device
                && c.module.as_ref().is_some_and(|m| m.as_str() == module))
        });
        Ok(())
    }
}
