//! A Device Provisioning Service (DPS) compatible with Azure's, for the
//! devices of this verge-cloud.
//!
//! * Device side: register and poll, over MQTT ([`mqtt`], on the device
//!   endpoint's port — see there why) and over HTTPS REST ([`http`], on the
//!   service API's port), both answering as DPS does: 202 `assigning` with an
//!   `operationId`, then 200 `assigned` when polled.
//! * Attestation: symmetric keys, individual enrollments (the enrollment's
//!   keys) and groups (device key = HMAC-SHA256(group key, registration id));
//!   X.509, the device's client certificate in the TLS handshake (CN = the
//!   registration id): an individual enrollment's certificate by thumbprint,
//!   a group's by its chain reaching the group's signing certificate. An
//!   X.509 device is created `selfSigned` with its leaf's thumbprint (DPS
//!   creates a group's devices `certificateAuthority`; the thumbprint needs no
//!   CA uploaded to this hub, and a renewed certificate re-provisions).
//! * Assignment: to this verge-cloud under `iothub_hostname` (or the
//!   enrollment's `iotHubHostName`); the device is created in the registry
//!   with the attestation keys, so it connects to the hub with the same key it
//!   registered with. Registering again follows the enrollment's
//!   `reprovisionPolicy`: `migrateDeviceData = false` deletes and re-creates
//!   the device (twin reset to the enrollment's `initialTwin`).
//! * Enrollments and registration states: the service API ([`http`]) and
//!   `verge cloud dps …`; enrollments kept in `{data_dir}/dps/state.json`,
//!   registration states one file each in `{data_dir}/dps/registrations/`
//!   (atomic writes).

pub mod demux;
pub mod enrollment;
pub mod http;
pub mod mqtt;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use verge_core::time::Timestamp;
use verge_core::{ClientId, DeviceId, SasToken};

use crate::registry::{DeviceSpec, SymmetricKeys};
use crate::{CloudError, CloudState};
pub use enrollment::{Attestation, Enrollment, ReprovisionPolicy, check_registration_id};

/// The `api-version` answers carry (what the Python SDK sends).
pub const API_VERSION: &str = "2019-03-31";
/// How long an operation id can be polled after it finished.
const OPERATION_TTL: Duration = Duration::from_secs(600);
/// Operations remembered at once; the oldest go first beyond this.
const MAX_OPERATIONS: usize = 4096;
/// `retry-after` sent with `assigning` answers, seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The DPS's settings.
#[derive(Debug, Clone)]
pub struct DpsOptions {
    /// Where `state.json` lives.
    pub dir: PathBuf,
    /// The ID scope devices put in their paths and tokens.
    pub id_scope: String,
    /// The hub host name devices are assigned to.
    pub iothub_hostname: String,
}

/// ID scopes: ASCII letters and digits (DPS's look like `0ne0001A2B3`).
pub fn valid_id_scope(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The ID scope kept in `{dir}/id_scope`, generated (`0ne` + 8 hex digits)
/// on first use. Blocking.
pub fn load_or_create_id_scope(dir: &std::path::Path) -> std::io::Result<String> {
    verge_files::create_private_dir(dir)?;
    let path = dir.join("id_scope");
    match std::fs::read_to_string(&path) {
        Ok(s) if valid_id_scope(s.trim()) => return Ok(s.trim().to_owned()),
        Ok(s) => {
            return Err(std::io::Error::other(format!(
                "{}: {:?} is not an ID scope",
                path.display(),
                s.trim()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let scope = format!(
        "0ne{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8].to_ascii_uppercase()
    );
    verge_files::write_atomic(&path, scope.as_bytes())?;
    Ok(scope)
}

/// A registration's last outcome, as the service API's
/// `DeviceRegistrationState` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationRecord {
    /// The registration id (file names are hashes of it).
    pub registration_id: String,
    /// The device created for it.
    pub device_id: String,
    /// The hub it was assigned to.
    pub assigned_hub: String,
    /// The group it matched, if not an individual enrollment.
    pub enrollment_group_id: Option<String>,
    /// What the device sent as `payload`.
    pub device_payload: Option<Value>,
    /// First assignment, Unix ms.
    pub created_ms: i64,
    /// Last assignment, Unix ms.
    pub updated_ms: i64,
    /// `initialAssignment`, `deviceDataMigrated` or `deviceDataReset`.
    pub substatus: String,
    /// Bumped on every assignment.
    pub version: u64,
}

/// Everything that is persisted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    individual: BTreeMap<String, Enrollment>,
    groups: BTreeMap<String, Enrollment>,
}

/// A register or poll answer: HTTP status and JSON body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// 200, 202 or an error status.
    pub status: u16,
    /// The body.
    pub body: Value,
}

impl Answer {
    /// A DPS-shaped error (`errorCode` is status × 1000 + detail, as DPS's).
    pub fn error(e: &CloudError) -> Self {
        let status = e.status();
        Self {
            status,
            body: json!({
                "errorCode": u32::from(status) * 1000 + 1,
                "message": e.to_string(),
                "trackingId": uuid::Uuid::new_v4().to_string(),
                "timestampUtc": Timestamp::now().to_iso8601(),
            }),
        }
    }
}

/// A finished registration, kept for polls.
struct Operation {
    registration_id: String,
    result: Value,
    at: Instant,
}

/// The provisioning service.
pub struct Dps {
    opts: DpsOptions,
    cloud: CloudState,
    /// Serialises changes (a change is written to disk before it is seen).
    write: tokio::sync::Mutex<()>,
    state: Mutex<Stored>,
    /// One file each under `{dir}/registrations/` (a fleet's worth would
    /// make one file's rewrite per registration grow with the fleet).
    registrations: Mutex<BTreeMap<String, RegistrationRecord>>,
    operations: Mutex<(HashMap<String, Operation>, VecDeque<String>)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not stop provisioning; the data stays valid
    // because changes are applied whole after their write.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_now() -> u64 {
    u64::try_from(Timestamp::now().as_millis() / 1000).unwrap_or(0)
}

fn iso(ms: i64) -> String {
    Timestamp::from_millis(ms).to_iso8601()
}

impl Dps {
    /// Loads the enrollments from `opts.dir` (created private if missing).
    pub async fn open(opts: DpsOptions, cloud: CloudState) -> anyhow::Result<Arc<Self>> {
        let dir = opts.dir.clone();
        let (stored, registrations) = tokio::task::spawn_blocking(move || {
            verge_files::create_private_dir(&dir)?;
            let stored: Stored =
                verge_files::load_json(&dir.join("state.json"))?.unwrap_or_default();
            let regs_dir = dir.join("registrations");
            verge_files::create_private_dir(&regs_dir)?;
            let mut regs = BTreeMap::new();
            for entry in std::fs::read_dir(&regs_dir)? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "json")
                    && let Some(r) = verge_files::load_json::<RegistrationRecord>(&path)?
                {
                    regs.insert(r.registration_id.clone(), r);
                }
            }
            Ok::<_, std::io::Error>((stored, regs))
        })
        .await??;
        Ok(Arc::new(Self {
            opts,
            cloud,
            write: tokio::sync::Mutex::new(()),
            state: Mutex::new(stored),
            registrations: Mutex::new(registrations),
            operations: Mutex::new((HashMap::new(), VecDeque::new())),
        }))
    }

    /// The ID scope.
    pub fn id_scope(&self) -> &str {
        &self.opts.id_scope
    }

    /// Applies `change` to a copy of the state, writes it, then publishes
    /// it. `change`'s error leaves everything as it was.
    async fn update<T>(
        &self,
        change: impl FnOnce(&mut Stored) -> Result<T, CloudError>,
    ) -> Result<T, CloudError> {
        let _w = self.write.lock().await;
        let mut next = lock(&self.state).clone();
        let out = change(&mut next)?;
        let bytes = serde_json::to_vec(&next).map_err(|e| CloudError::Storage(e.to_string()))?;
        verge_files::write_atomic_async(self.opts.dir.join("state.json"), bytes)
            .await
            .map_err(|e| CloudError::Storage(format!("dps state: {e}")))?;
        *lock(&self.state) = next;
        Ok(out)
    }

    // ------------------------------------------------------------ enrollments

    /// Creates or replaces an enrollment (`group` selects the kind).
    /// `if_match` must match an existing one's etag (`*` matches any).
    pub async fn put_enrollment(
        &self,
        group: bool,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> Result<Value, CloudError> {
        if group {
            verge_core::DeviceId::new(id)
                .map_err(|e| CloudError::BadRequest(format!("enrollment group id: {e}")))?;
        } else {
            check_registration_id(id)?;
        }
        let field = id_field(group);
        let id = id.to_owned();
        self.update(|s| {
            let map = if group {
                &mut s.groups
            } else {
                &mut s.individual
            };
            let previous = map.get(&id);
            if let (Some(p), Some(h)) = (previous, if_match)
                && !crate::registry::if_match(h, &p.etag())
            {
                return Err(CloudError::PreconditionFailed(format!(
                    "etag {h} does not match enrollment {id:?}"
                )));
            }
            let e = Enrollment::from_json(
                body,
                field,
                &id,
                group,
                previous,
                Timestamp::now().as_millis(),
            )?;
            let json = e.to_json(field, &id);
            map.insert(id.clone(), e);
            Ok(json)
        })
        .await
    }

    /// One enrollment's JSON.
    pub fn get_enrollment(&self, group: bool, id: &str) -> Result<Value, CloudError> {
        let s = lock(&self.state);
        let map = if group { &s.groups } else { &s.individual };
        map.get(id)
            .map(|e| e.to_json(id_field(group), id))
            .ok_or_else(|| not_found(group, id))
    }

    /// All enrollments of a kind.
    pub fn list_enrollments(&self, group: bool) -> Vec<Value> {
        let s = lock(&self.state);
        let map = if group { &s.groups } else { &s.individual };
        map.iter()
            .map(|(id, e)| e.to_json(id_field(group), id))
            .collect()
    }

    /// Deletes an enrollment (its devices stay in the registry, as in DPS).
    pub async fn delete_enrollment(&self, group: bool, id: &str) -> Result<(), CloudError> {
        let id = id.to_owned();
        self.update(|s| {
            let map = if group {
                &mut s.groups
            } else {
                &mut s.individual
            };
            map.remove(&id)
                .map(|_| ())
                .ok_or_else(|| not_found(group, &id))
        })
        .await
    }

    /// A registration's state (`GET /registrations/{id}`).
    pub fn get_registration(&self, id: &str) -> Result<Value, CloudError> {
        lock(&self.registrations)
            .get(id)
            .map(|r| registration_state(id, r, None))
            .ok_or_else(|| CloudError::NotFound(format!("no registration {id:?}")))
    }

    /// Forgets a registration's state (the device stays).
    pub async fn delete_registration(&self, id: &str) -> Result<(), CloudError> {
        if !lock(&self.registrations).contains_key(id) {
            return Err(CloudError::NotFound(format!("no registration {id:?}")));
        }
        verge_files::remove_durable_async(self.registration_path(id))
            .await
            .map_err(|e| CloudError::Storage(format!("dps registration: {e}")))?;
        lock(&self.registrations).remove(id);
        Ok(())
    }

    fn registration_path(&self, id: &str) -> PathBuf {
        self.opts
            .dir
            .join("registrations")
            .join(verge_files::keyed_file_name(id, "json"))
    }

    // ----------------------------------------------------------- attestation

    /// Checks a device's SAS token for `registration_id`: `sr` must be
    /// `{idScope}/registrations/{registrationId}` (any case: aziot lowercases
    /// it before signing; the signature is checked over `sr` as sent), not
    /// expired, signed with the individual enrollment's key or a group's
    /// derived key. Unknown registration (no individual enrollment and no
    /// group to try) → 404; anything else → 401.
    pub fn authenticate(&self, registration_id: &str, token: &str) -> Result<Match, CloudError> {
        check_registration_id(registration_id)?;
        let unauthorized = |m: String| CloudError::Unauthorized(m);
        let token = SasToken::parse(token).map_err(|e| unauthorized(e.to_string()))?;
        let expected = format!("{}/registrations/{registration_id}", self.opts.id_scope);
        if !token.resource().eq_ignore_ascii_case(&expected) {
            return Err(unauthorized(format!(
                "token audience {:?} is not {expected:?}",
                token.resource()
            )));
        }
        token
            .check_expiry(unix_now())
            .map_err(|e| unauthorized(e.to_string()))?;
        let s = lock(&self.state);
        let signed_by = |keys: &SymmetricKeys| {
            keys.decoded()
                .iter()
                .any(|k| token.verify_signature(k).is_ok())
        };
        if let Some(e) = s.individual.get(registration_id) {
            // An individual enrollment wins over groups, as in DPS.
            let keys = e.device_keys(registration_id, false);
            return match keys {
                Some(k) if signed_by(&k) => Ok(Match {
                    group: None,
                    enrollment: e.clone(),
                    credential: Credential::Keys(k),
                }),
                None => Err(unauthorized(format!(
                    "the enrollment of {registration_id:?} is X.509: present its certificate"
                ))),
                _ => Err(unauthorized(format!(
                    "SAS signature for {registration_id:?} does not match its enrollment"
                ))),
            };
        }
        if s.groups.is_empty() {
            return Err(CloudError::NotFound(format!(
                "no enrollment for registration {registration_id:?}"
            )));
        }
        for (gid, g) in &s.groups {
            if let Some(k) = g.device_keys(registration_id, true)
                && signed_by(&k)
            {
                return Ok(Match {
                    group: Some(gid.clone()),
                    enrollment: g.clone(),
                    credential: Credential::Keys(k),
                });
            }
        }
        Err(unauthorized(format!(
            "SAS signature for {registration_id:?} matches no enrollment"
        )))
    }

    /// Checks a device's certificate chain (leaf first, as its TLS
    /// handshake presented it) for `registration_id`: the leaf's CN is the
    /// registration id and it is within its validity; an individual
    /// enrollment's certificate by thumbprint, else a group whose signing
    /// certificate the chain reaches. Unknown registration → 404; anything
    /// else → 401.
    pub fn authenticate_cert(
        &self,
        registration_id: &str,
        chain: &[verge_x509::CertificateDer<'static>],
    ) -> Result<Match, CloudError> {
        check_registration_id(registration_id)?;
        let unauthorized = |m: String| CloudError::Unauthorized(m);
        let leaf = chain
            .first()
            .ok_or_else(|| unauthorized("no client certificate".into()))?;
        let cn = verge_x509::common_name(leaf).unwrap_or_default();
        if cn != registration_id {
            return Err(unauthorized(format!(
                "the certificate's CN {cn:?} is not the registration id {registration_id:?}"
            )));
        }
        let thumbprint = verge_x509::thumbprints(leaf).1;
        let s = lock(&self.state);
        if let Some(e) = s.individual.get(registration_id) {
            let certs = e.x509_certificates();
            if certs.is_empty() {
                return Err(unauthorized(format!(
                    "the enrollment of {registration_id:?} uses symmetric keys: sign a SAS token"
                )));
            }
            let mut thumbs = certs.iter().map(|c| verge_x509::thumbprints(c).1);
            let auth = verge_x509::X509Auth::SelfSigned {
                primary: thumbs.next(),
                secondary: thumbs.next(),
            };
            verge_x509::verify_device(chain, registration_id, &auth, &[], unix_now())
                .map_err(|e| unauthorized(format!("X.509: {e}")))?;
            return Ok(Match {
                group: None,
                enrollment: e.clone(),
                credential: Credential::Thumbprint(thumbprint),
            });
        }
        if s.groups.is_empty() {
            return Err(CloudError::NotFound(format!(
                "no enrollment for registration {registration_id:?}"
            )));
        }
        let mut why = String::from("no X.509 enrollment group");
        for (gid, g) in &s.groups {
            let signers = g.x509_certificates();
            if signers.is_empty() {
                continue;
            }
            match verge_x509::verify_device(
                chain,
                registration_id,
                &verge_x509::X509Auth::CertificateAuthority,
                &signers,
                unix_now(),
            ) {
                Ok(()) => {
                    return Ok(Match {
                        group: Some(gid.clone()),
                        enrollment: g.clone(),
                        credential: Credential::Thumbprint(thumbprint),
                    });
                }
                Err(e) => why = format!("group {gid:?}: {e}"),
            }
        }
        Err(unauthorized(format!(
            "the certificate of {registration_id:?} matches no enrollment ({why})"
        )))
    }

    // ------------------------------------------------------------- register

    /// Registers an authenticated device: assigns it (creating or updating
    /// the device in the registry) and returns the 202 `assigning` answer;
    /// the outcome is kept for [`poll`](Self::poll) under its operation id.
    pub async fn register(&self, registration_id: &str, m: Match, body: &Value) -> Answer {
        let device_payload = match parse_register_body(registration_id, body) {
            Ok(p) => p,
            Err(e) => return Answer::error(&e),
        };
        let operation_id = format!(
            "5.{:016x}.{}",
            u64::from_le_bytes(
                uuid::Uuid::new_v4().as_bytes()[..8]
                    .try_into()
                    .unwrap_or([0; 8])
            ),
            uuid::Uuid::new_v4()
        );
        let result = match self.assign(registration_id, &m, device_payload).await {
            Ok(state) => json!({
                "operationId": operation_id,
                "status": "assigned",
                "registrationState": state,
            }),
            Err(e) => {
                tracing::warn!(registration = registration_id, error = %e, "DPS assignment failed");
                let err = Answer::error(&e);
                json!({
                    "operationId": operation_id,
                    "status": "failed",
                    "registrationState": {
                        "registrationId": registration_id,
                        "status": "failed",
                        "errorCode": err.body["errorCode"],
                        "errorMessage": e.to_string(),
                    },
                })
            }
        };
        self.remember(&operation_id, registration_id, result);
        Answer {
            status: 202,
            body: json!({
                "operationId": operation_id,
                "status": "assigning",
                "registrationState": {"registrationId": registration_id, "status": "assigning"},
            }),
        }
    }

    /// The outcome of `operation_id`, which must belong to `registration_id`.
    pub fn poll(&self, registration_id: &str, operation_id: &str) -> Answer {
        let ops = lock(&self.operations);
        match ops.0.get(operation_id) {
            // Done (assigned or failed): 200, as DPS answers a finished operation.
            Some(op) if op.registration_id == registration_id => Answer {
                status: 200,
                body: op.result.clone(),
            },
            _ => Answer::error(&CloudError::NotFound(format!(
                "no operation {operation_id:?} for registration {registration_id:?}"
            ))),
        }
    }

    fn remember(&self, operation_id: &str, registration_id: &str, result: Value) {
        let mut ops = lock(&self.operations);
        let (map, order) = &mut *ops;
        let now = Instant::now();
        while let Some(oldest) = order.front() {
            let expired = map
                .get(oldest)
                .is_none_or(|o| now.duration_since(o.at) > OPERATION_TTL);
            if !expired && map.len() < MAX_OPERATIONS {
                break;
            }
            if let Some(id) = order.pop_front() {
                map.remove(&id);
            }
        }
        map.insert(
            operation_id.to_owned(),
            Operation {
                registration_id: registration_id.to_owned(),
                result,
                at: now,
            },
        );
        order.push_back(operation_id.to_owned());
    }

    async fn assign(
        &self,
        registration_id: &str,
        m: &Match,
        device_payload: Option<Value>,
    ) -> Result<Value, CloudError> {
        let e = &m.enrollment;
        if e.disabled {
            return Err(CloudError::Unauthorized(format!(
                "the enrollment of {registration_id:?} is disabled"
            )));
        }
        let device_id = e
            .device_id
            .clone()
            .unwrap_or_else(|| registration_id.to_owned());
        let hub = e
            .iot_hub_host_name
            .clone()
            .unwrap_or_else(|| self.opts.iothub_hostname.clone());
        let previous = lock(&self.registrations).get(registration_id).cloned();
        let exists = self.cloud.get_device(&device_id).is_ok();
        let spec = match &m.credential {
            Credential::Keys(k) => DeviceSpec {
                keys: Some(k.clone()),
                iot_edge: e.iot_edge,
                ..DeviceSpec::default()
            },
            Credential::Thumbprint(t) => DeviceSpec {
                x509: Some(verge_x509::X509Auth::SelfSigned {
                    primary: Some(t.clone()),
                    secondary: None,
                }),
                iot_edge: e.iot_edge,
                ..DeviceSpec::default()
            },
        };
        let substatus = match (&previous, exists) {
            (None, false) | (Some(_), false) => {
                self.create_device(&device_id, spec, e.initial_twin.as_ref())
                    .await?;
                if previous.is_some() {
                    "deviceDataReset"
                } else {
                    "initialAssignment"
                }
            }
            (_, true) if !e.reprovision.migrate_device_data && previous.is_some() => {
                // Reset: the device and its twin start again from the enrollment.
                self.cloud
                    .delete_device(&device_id, Some("*".into()))
                    .await?;
                self.create_device(&device_id, spec, e.initial_twin.as_ref())
                    .await?;
                "deviceDataReset"
            }
            (_, true) => {
                // Keep the device and its twin; the keys follow the enrollment.
                self.cloud
                    .put_device(&device_id, spec, Some("*".into()))
                    .await?;
                if previous.is_some() {
                    "deviceDataMigrated"
                } else {
                    "initialAssignment"
                }
            }
        };
        let now = Timestamp::now().as_millis();
        let rec = RegistrationRecord {
            registration_id: registration_id.to_owned(),
            device_id,
            assigned_hub: hub,
            enrollment_group_id: m.group.clone(),
            device_payload,
            created_ms: previous.as_ref().map_or(now, |p| p.created_ms),
            updated_ms: now,
            substatus: substatus.to_owned(),
            version: previous.as_ref().map_or(1, |p| p.version + 1),
        };
        let bytes = serde_json::to_vec(&rec).map_err(|e| CloudError::Storage(e.to_string()))?;
        verge_files::write_atomic_async(self.registration_path(registration_id), bytes)
            .await
            .map_err(|e| CloudError::Storage(format!("dps registration: {e}")))?;
        lock(&self.registrations).insert(registration_id.to_owned(), rec.clone());
        tracing::info!(registration = registration_id, device = %rec.device_id, hub = %rec.assigned_hub, substatus, "DPS assigned");
        Ok(registration_state(
            registration_id,
            &rec,
            Some(e.payload.clone().unwrap_or(Value::Null)),
        ))
    }

    async fn create_device(
        &self,
        device_id: &str,
        spec: DeviceSpec,
        initial_twin: Option<&Value>,
    ) -> Result<(), CloudError> {
        self.cloud.put_device(device_id, spec, None).await?;
        if let Some(t) = initial_twin {
            let client = ClientId::device(
                DeviceId::new(device_id).map_err(|e| CloudError::BadRequest(e.to_string()))?,
            );
            self.cloud.update_twin(&client, t.clone(), None).await?;
        }
        Ok(())
    }
}

/// What a token was verified against.
#[derive(Debug, Clone)]
pub struct Match {
    /// The group's id, for a group enrollment.
    pub group: Option<String>,
    /// The enrollment (a copy).
    pub enrollment: Enrollment,
    /// How the device will authenticate to the hub.
    pub credential: Credential,
}

/// The credential a registration proved, which its device is created with.
#[derive(Debug, Clone)]
pub enum Credential {
    /// The keys the device signs with (derived for a group).
    Keys(SymmetricKeys),
    /// The SHA-256 thumbprint of the device's certificate.
    Thumbprint(String),
}

fn id_field(group: bool) -> &'static str {
    if group {
        "enrollmentGroupId"
    } else {
        "registrationId"
    }
}

fn not_found(group: bool, id: &str) -> CloudError {
    let kind = if group {
        "enrollment group"
    } else {
        "enrollment"
    };
    CloudError::NotFound(format!("no {kind} {id:?}"))
}

/// The register body: `{"registrationId": …, "payload": …}`; the id must
/// match the path's. Returns the payload.
pub fn parse_register_body(
    registration_id: &str,
    body: &Value,
) -> Result<Option<Value>, CloudError> {
    let o = body.as_object().ok_or_else(|| {
        CloudError::BadRequest("the body must be a JSON object with registrationId".into())
    })?;
    match o.get("registrationId") {
        Some(Value::String(r)) if r == registration_id => {}
        Some(Value::String(r)) => {
            return Err(CloudError::BadRequest(format!(
                "registrationId {r:?} in the body does not match {registration_id:?}"
            )));
        }
        _ => {
            return Err(CloudError::BadRequest(
                "registrationId (a string) is required".into(),
            ));
        }
    }
    Ok(o.get("payload").filter(|p| !p.is_null()).cloned())
}

/// `registrationState` as DPS answers it; `payload` is given to devices
/// (it is the enrollment's), absent in the service view.
fn registration_state(id: &str, r: &RegistrationRecord, payload: Option<Value>) -> Value {
    let mut v = json!({
        "registrationId": id,
        "createdDateTimeUtc": iso(r.created_ms),
        "assignedHub": r.assigned_hub,
        "deviceId": r.device_id,
        "status": "assigned",
        "substatus": r.substatus,
        "lastUpdatedDateTimeUtc": iso(r.updated_ms),
        "etag": crate::registry::etag_of(r.version),
    });
    if let Some(o) = v.as_object_mut() {
        if let Some(p) = payload {
            o.insert("payload".into(), p);
        }
        if let Some(g) = &r.enrollment_group_id {
            o.insert("enrollmentGroupId".into(), json!(g));
        }
    }
    v
}
