//! `verge cloud dps …`: verge-cloud's Device Provisioning Service, through
//! DPS's service REST API on verge-cloud's service port (enrollments,
//! enrollment groups, registration states). Symmetric-key or X.509
//! attestation (`--certificate`: a device's own certificate for an
//! enrollment, the CA certificate that signs the devices for a group).

use anyhow::Context as _;
use base64::Engine as _;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use verge_core::SharedAccessKey;

use crate::Output;
use crate::cloud::CloudClient;
use crate::ui;

/// `verge cloud dps`.
#[derive(Subcommand)]
pub enum DpsCommand {
    /// Individual enrollments (one device each).
    #[command(subcommand)]
    Enrollment(EnrollmentCommand),
    /// Enrollment groups (device keys derived from the group's key).
    #[command(subcommand)]
    Group(GroupCommand),
    /// A registration's state (its assigned hub and device).
    Registration {
        /// The registration id.
        registration_id: String,
    },
    /// Print the device key for a registration id from a group key:
    /// base64(HMAC-SHA256(group key, registration id)), what a device of a
    /// group enrollment signs with (`symmetric_key` in verged's config).
    DeriveKey {
        /// The group's (primary or secondary) key, base64.
        group_key: String,
        /// The registration id.
        registration_id: String,
    },
}

/// What both enrollment kinds take when created.
#[derive(Args)]
pub struct EnrollmentSpec {
    /// Primary key (base64) [default: generated].
    #[arg(long)]
    primary_key: Option<String>,
    /// Secondary key (base64) [default: generated].
    #[arg(long)]
    secondary_key: Option<String>,
    /// X.509 attestation instead of keys: a PEM file with the device's
    /// certificate (enrollment) or the CA certificate that signs the
    /// devices (group); a second `--certificate` is the secondary.
    #[arg(long, value_name = "PEM_FILE", conflicts_with_all = ["primary_key", "secondary_key"])]
    certificate: Vec<std::path::PathBuf>,
    /// Devices are IoT Edge devices.
    #[arg(long)]
    edge: bool,
    /// Re-provisioning resets the device and its twin to the initial twin
    /// (`reprovisionPolicy.migrateDeviceData = false`) instead of keeping them.
    #[arg(long)]
    reset_on_reprovision: bool,
    /// The initial twin, JSON (`{"tags":…,"properties":{"desired":…}}`) or @file.
    #[arg(long)]
    initial_twin: Option<String>,
    /// The hub host name devices are assigned to [default: verge-cloud's].
    #[arg(long)]
    iothub_hostname: Option<String>,
    /// Returned to devices as `registrationState.payload`, JSON or @file.
    #[arg(long)]
    payload: Option<String>,
    /// Create it disabled.
    #[arg(long)]
    disabled: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
}

/// `verge cloud dps enrollment`.
#[derive(Subcommand)]
pub enum EnrollmentCommand {
    /// List the individual enrollments.
    List,
    /// Create or replace an individual enrollment.
    Create {
        /// The registration id.
        registration_id: String,
        /// The device id to create [default: the registration id].
        #[arg(long)]
        device_id: Option<String>,
        #[command(flatten)]
        spec: EnrollmentSpec,
    },
    /// Show an enrollment (with its keys).
    Show {
        /// The registration id.
        registration_id: String,
    },
    /// Delete an enrollment (the device stays in the registry).
    Delete {
        /// The registration id.
        registration_id: String,
    },
}

/// `verge cloud dps group`.
#[derive(Subcommand)]
pub enum GroupCommand {
    /// List the enrollment groups.
    List,
    /// Create or replace an enrollment group.
    Create {
        /// The group id.
        group_id: String,
        #[command(flatten)]
        spec: EnrollmentSpec,
    },
    /// Show a group (with its keys).
    Show {
        /// The group id.
        group_id: String,
    },
    /// Delete a group (its devices stay in the registry).
    Delete {
        /// The group id.
        group_id: String,
    },
}

fn json_arg(what: &str, text: &str) -> anyhow::Result<Value> {
    let text = match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => text.to_owned(),
    };
    serde_json::from_str(&text).with_context(|| format!("{what} is not valid JSON"))
}

fn body(
    id_field: &str,
    id: &str,
    device_id: Option<&str>,
    s: &EnrollmentSpec,
) -> anyhow::Result<Value> {
    let attestation = if s.certificate.is_empty() {
        let mut sk = serde_json::Map::new();
        if let Some(k) = &s.primary_key {
            sk.insert("primaryKey".into(), json!(k));
        }
        if let Some(k) = &s.secondary_key {
            sk.insert("secondaryKey".into(), json!(k));
        }
        json!({"type": "symmetricKey", "symmetricKey": sk})
    } else {
        anyhow::ensure!(
            s.certificate.len() <= 2,
            "at most two --certificate (primary, secondary)"
        );
        let mut slots = serde_json::Map::new();
        for (slot, path) in ["primary", "secondary"].iter().zip(&s.certificate) {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            slots.insert((*slot).into(), json!({ "certificate": pem }));
        }
        let field = if id_field == "enrollmentGroupId" {
            "signingCertificates"
        } else {
            "clientCertificates"
        };
        json!({"type": "x509", "x509": { field: slots }})
    };
    let mut v = json!({
        id_field: id,
        "attestation": attestation,
        "capabilities": {"iotEdge": s.edge},
        "provisioningStatus": if s.disabled { "disabled" } else { "enabled" },
        "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": !s.reset_on_reprovision},
    });
    let o = v.as_object_mut().context("enrollment body")?;
    if let Some(d) = device_id {
        o.insert("deviceId".into(), json!(d));
    }
    if let Some(h) = &s.iothub_hostname {
        o.insert("iotHubHostName".into(), json!(h));
    }
    if let Some(t) = &s.initial_twin {
        o.insert("initialTwin".into(), json_arg("--initial-twin", t)?);
    }
    if let Some(p) = &s.payload {
        o.insert("payload".into(), json_arg("--payload", p)?);
    }
    Ok(v)
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn show(v: &Value, id_field: &str, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(v);
    }
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    println!("{}: {}", id_field, s(&format!("/{id_field}")));
    println!("status: {}", s("/provisioningStatus"));
    println!(
        "edge: {}",
        v.pointer("/capabilities/iotEdge")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    );
    if s("/attestation/type") == "x509" {
        let certs = v
            .pointer("/attestation/x509")
            .and_then(Value::as_object)
            .and_then(|x| x.values().next())
            .and_then(Value::as_object);
        for (slot, c) in certs.into_iter().flatten() {
            let info = |k: &str| c.pointer(&format!("/info/{k}")).and_then(Value::as_str);
            println!(
                "{slot} certificate: {} (SHA-256 {})",
                info("subjectName").unwrap_or("?"),
                info("sha256Thumbprint").unwrap_or("?")
            );
        }
        return Ok(());
    }
    println!("primary key: {}", s("/attestation/symmetricKey/primaryKey"));
    println!(
        "secondary key: {}",
        s("/attestation/symmetricKey/secondaryKey")
    );
    Ok(())
}

fn list(v: &Value, id_field: &str) {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let s = |p: &str| {
                e.pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            vec![
                s(&format!("/{id_field}")),
                s("/provisioningStatus"),
                e.pointer("/capabilities/iotEdge")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
                    .to_string(),
                if e.pointer("/reprovisionPolicy/migrateDeviceData") == Some(&json!(false)) {
                    "reset".to_owned()
                } else {
                    "keep".to_owned()
                },
            ]
        })
        .collect();
    print!(
        "{}",
        ui::table(&["ID", "STATUS", "EDGE", "ON REPROVISION"], &rows)
    );
}

fn enc(s: &str) -> String {
    verge_core::sas::url_encode(s)
}

/// Runs `verge cloud dps …`.
pub async fn run(client: &CloudClient, cmd: DpsCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    const IND: &str = "registrationId";
    const GRP: &str = "enrollmentGroupId";
    match cmd {
        DpsCommand::Enrollment(EnrollmentCommand::List) => {
            list(&client.get("/enrollments").await?, IND);
            Ok(())
        }
        DpsCommand::Enrollment(EnrollmentCommand::Create {
            registration_id,
            device_id,
            spec,
        }) => {
            let b = body(IND, &registration_id, device_id.as_deref(), &spec)?;
            let v = client
                .call(
                    Method::PUT,
                    &format!("/enrollments/{}", enc(&registration_id)),
                    Some(&b),
                )
                .await?;
            show(&v, IND, spec.output)
        }
        DpsCommand::Enrollment(EnrollmentCommand::Show { registration_id }) => print_json(
            &client
                .get(&format!("/enrollments/{}", enc(&registration_id)))
                .await?,
        ),
        DpsCommand::Enrollment(EnrollmentCommand::Delete { registration_id }) => {
            client
                .call(
                    Method::DELETE,
                    &format!("/enrollments/{}", enc(&registration_id)),
                    None,
                )
                .await?;
            println!("enrollment {registration_id} deleted");
            Ok(())
        }
        DpsCommand::Group(GroupCommand::List) => {
            list(&client.get("/enrollmentGroups").await?, GRP);
            Ok(())
        }
        DpsCommand::Group(GroupCommand::Create { group_id, spec }) => {
            let b = body(GRP, &group_id, None, &spec)?;
            let v = client
                .call(
                    Method::PUT,
                    &format!("/enrollmentGroups/{}", enc(&group_id)),
                    Some(&b),
                )
                .await?;
            show(&v, GRP, spec.output)
        }
        DpsCommand::Group(GroupCommand::Show { group_id }) => print_json(
            &client
                .get(&format!("/enrollmentGroups/{}", enc(&group_id)))
                .await?,
        ),
        DpsCommand::Group(GroupCommand::Delete { group_id }) => {
            client
                .call(
                    Method::DELETE,
                    &format!("/enrollmentGroups/{}", enc(&group_id)),
                    None,
                )
                .await?;
            println!("enrollment group {group_id} deleted");
            Ok(())
        }
        DpsCommand::Registration { registration_id } => print_json(
            &client
                .get(&format!("/registrations/{}", enc(&registration_id)))
                .await?,
        ),
        DpsCommand::DeriveKey {
            group_key,
            registration_id,
        } => {
            println!("{}", derive_key(&group_key, &registration_id)?);
            Ok(())
        }
    }
}

/// base64(HMAC-SHA256(base64decode(group key), registration id)).
fn derive_key(group_key: &str, registration_id: &str) -> anyhow::Result<String> {
    let key = SharedAccessKey::from_base64(group_key).context("group key")?;
    Ok(base64::engine::general_purpose::STANDARD.encode(key.derive(registration_id).as_bytes()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn derived_key_matches_python_hmac() {
        // python3: base64(hmac.new(bytes(range(16)), b"dev-1", sha256).digest())
        assert_eq!(
            derive_key("AAECAwQFBgcICQoLDA0ODw==", "dev-1").unwrap(),
            "I6wj/zJDkG6Ta/Wc6A5aw/nV0gAkdMKN32/YWUcI028="
        );
        assert!(derive_key("!!", "dev-1").is_err());
    }
}
