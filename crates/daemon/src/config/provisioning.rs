//! `[provisioning]`: manual (a connection string, or aziot's shape with a
//! symmetric key or an X.509 certificate) or DPS with symmetric-key or
//! X.509 attestation, and the hub's HTTPS port; TPM is refused with an
//! error that says so.

use super::*;

pub(super) fn parse_provisioning(
    ctx: &Ctx<'_>,
    raw: &Spanned<RawProvisioning>,
    homedir: &Path,
) -> Result<(ProvisioningConfig, Option<DpsSettings>), ConfigError> {
    let p = raw.get_ref();
    match p.source.get_ref().as_str() {
        "manual" => parse_manual(ctx, raw).map(|m| (m, None)),
        "dps" => {
            let settings = parse_dps(ctx, raw)?;
            let https_port = parse_https_port(ctx, p)?;
            let cached = crate::dps::read_cache(homedir, &settings)
                .map_err(|e| ctx.err(Some(p.source.span()), "provisioning", e.to_string()))?;
            let Some(a) = cached else {
                return Err(ctx.err(Some(p.source.span()), "provisioning", NOT_PROVISIONED));
            };
            let bad_cache = |e: String| {
                ctx.err(
                    Some(p.source.span()),
                    "provisioning",
                    format!("the cached DPS assignment is unusable ({e}); run `verge system reprovision`"),
                )
            };
            let prov = ProvisioningConfig {
                iothub_hostname: HubHostname::new(a.assigned_hub.as_str())
                    .map_err(|e| bad_cache(e.to_string()))?,
                device_id: DeviceId::new(a.device_id.as_str())
                    .map_err(|e| bad_cache(e.to_string()))?,
                credential: settings.attestation.clone(),
                https_port,
            };
            Ok((prov, Some(settings)))
        }
        other => Err(ctx.err(
            Some(p.source.span()),
            "provisioning.source",
            format!("unknown provisioning source {other:?}; expected \"manual\" or \"dps\""),
        )),
    }
}

fn parse_https_port(ctx: &Ctx<'_>, p: &RawProvisioning) -> Result<u16, ConfigError> {
    match &p.https_port {
        None => Ok(DEFAULT_HTTPS_PORT),
        Some(v) => u16::try_from(*v.get_ref())
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                ctx.err(
                    Some(v.span()),
                    "provisioning.https_port",
                    "must be a port number between 1 and 65535",
                )
            }),
    }
}

/// A key given as `{ value = "<base64>" }` (`{ uri = … }` is refused for now);
/// `key` is its dotted path, for messages.
fn key_ref(
    ctx: &Ctx<'_>,
    k: &Spanned<RawKeyRef>,
    key: &str,
) -> Result<SharedAccessKey, ConfigError> {
    match (&k.get_ref().value, &k.get_ref().uri) {
        (Some(v), None) => SharedAccessKey::from_base64(v.get_ref())
            .map_err(|e| ctx.err(Some(v.span()), &format!("{key}.value"), e.to_string())),
        (None, Some(u)) => Err(ctx.err(
            Some(u.span()),
            &format!("{key}.uri"),
            "key URIs are not supported yet; give the key inline as value = \"<base64>\"",
        )),
        _ => Err(ctx.err(Some(k.span()), key, "give exactly one of value or uri")),
    }
}

/// `source = "dps"`: endpoint, scope and symmetric-key attestation.
pub(super) fn parse_dps(
    ctx: &Ctx<'_>,
    raw: &Spanned<RawProvisioning>,
) -> Result<DpsSettings, ConfigError> {
    let p = raw.get_ref();
    let stray = [
        (
            p.connection_string.as_ref().map(Spanned::span),
            "provisioning.connection_string",
        ),
        (
            p.iothub_hostname.as_ref().map(Spanned::span),
            "provisioning.iothub_hostname",
        ),
        (
            p.device_id.as_ref().map(Spanned::span),
            "provisioning.device_id",
        ),
        (
            p.authentication.as_ref().map(Spanned::span),
            "provisioning.authentication",
        ),
    ];
    for (span, key) in stray {
        if let Some(span) = span {
            return Err(ctx.err(
                Some(span),
                key,
                "not used with source = \"dps\" (DPS assigns the hub and the device id)",
            ));
        }
    }
    let missing =
        |key: &str, what: &str| ctx.err(Some(raw.span()), key, format!("missing: {what}"));
    let ep = p.global_endpoint.as_ref().ok_or_else(|| {
        missing(
            "provisioning.global_endpoint",
            "the DPS URL, e.g. \"https://global.azure-devices-provisioning.net/\"",
        )
    })?;
    let host = ep
        .get_ref()
        .trim()
        .strip_prefix("https://")
        .map(|h| h.trim_end_matches('/'))
        .filter(|h| !h.is_empty() && !h.contains(['/', '?', '#', '@']) && !h.chars().any(char::is_whitespace))
        .ok_or_else(|| {
            ctx.err(
                Some(ep.span()),
                "provisioning.global_endpoint",
                "must be an https:// URL of a host (and port), e.g. \"https://global.azure-devices-provisioning.net/\"",
            )
        })?;
    let scope = p
        .id_scope
        .as_ref()
        .ok_or_else(|| missing("provisioning.id_scope", "the DPS ID scope"))?;
    let id_scope = scope.get_ref().trim().to_owned();
    if id_scope.is_empty() || !id_scope.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(ctx.err(
            Some(scope.span()),
            "provisioning.id_scope",
            "must be ASCII letters and digits",
        ));
    }
    let att = p.attestation.as_ref().ok_or_else(|| {
        missing(
            "provisioning.attestation",
            "[provisioning.attestation] method = \"symmetric_key\"",
        )
    })?;
    let a = att.get_ref();
    let x509 = match a.method.get_ref().as_str() {
        "symmetric_key" => false,
        "x509" => true,
        "tpm" => {
            return Err(ctx.err(
                Some(a.method.span()),
                "provisioning.attestation.method",
                "\"tpm\" attestation is not supported; use \"symmetric_key\" or \"x509\"",
            ));
        }
        other => {
            return Err(ctx.err(
                Some(a.method.span()),
                "provisioning.attestation.method",
                format!("unknown method {other:?}; expected \"symmetric_key\" or \"x509\""),
            ));
        }
    };
    let attestation = if x509 {
        if let Some(sk) = &a.symmetric_key {
            return Err(ctx.err(
                Some(sk.span()),
                "provisioning.attestation.symmetric_key",
                "only with method = \"symmetric_key\"",
            ));
        }
        let file = |v: &Option<Spanned<toml::Value>>, what: &str| {
            let key = format!("provisioning.attestation.{what}");
            match v {
                Some(v) => file_uri(ctx, v, &key),
                None => Err(ctx.err(
                    Some(att.span()),
                    &key,
                    format!("missing: give {what} = \"file:///path/to/{what}.pem\""),
                )),
            }
        };
        DeviceCredential::X509 {
            cert: file(&a.identity_cert, "identity_cert")?,
            key: file(&a.identity_pk, "identity_pk")?,
        }
    } else {
        for (v, what) in [
            (&a.identity_cert, "identity_cert"),
            (&a.identity_pk, "identity_pk"),
        ] {
            if let Some(v) = v {
                return Err(ctx.err(
                    Some(v.span()),
                    &format!("provisioning.attestation.{what}"),
                    "only with method = \"x509\"",
                ));
            }
        }
        let sk = a.symmetric_key.as_ref().ok_or_else(|| {
            ctx.err(
                Some(att.span()),
                "provisioning.attestation.symmetric_key",
                "missing: give symmetric_key = { value = \"<base64 key>\" }",
            )
        })?;
        DeviceCredential::SharedKey(key_ref(ctx, sk, "provisioning.attestation.symmetric_key")?)
    };
    let registration_id = match (&a.registration_id, &attestation) {
        (Some(rid), _) => {
            let id = rid.get_ref().trim().to_owned();
            check_registration_id(ctx, Some(rid.span()), &id)?;
            id
        }
        // aziot's default for X.509: the certificate's CN.
        (None, DeviceCredential::X509 { cert, .. }) => {
            let cn = std::fs::read_to_string(cert)
                .map_err(|e| e.to_string())
                .and_then(|pem| verge_x509::parse_certs(&pem))
                .and_then(|certs| {
                    certs
                        .first()
                        .and_then(|c| verge_x509::common_name(c))
                        .ok_or_else(|| "its certificate has no CN".to_owned())
                })
                .map_err(|e| {
                    ctx.err(
                        Some(att.span()),
                        "provisioning.attestation.registration_id",
                        format!(
                            "missing, and it cannot be taken from the CN of {} ({e}); give registration_id",
                            cert.display()
                        ),
                    )
                })?;
            check_registration_id(ctx, Some(att.span()), &cn)?;
            cn
        }
        (None, DeviceCredential::SharedKey(_)) => {
            return Err(ctx.err(
                Some(att.span()),
                "provisioning.attestation.registration_id",
                "missing",
            ));
        }
    };
    Ok(DpsSettings {
        global_endpoint: format!("https://{host}"),
        id_scope,
        registration_id,
        attestation,
    })
}

/// DPS's registration ids: 1-128 lowercase letters, digits or `-._:`.
fn check_registration_id(
    ctx: &Ctx<'_>,
    span: Option<Range<usize>>,
    id: &str,
) -> Result<(), ConfigError> {
    if verge_core::id::is_registration_id(id) {
        Ok(())
    } else {
        Err(ctx.err(
            span,
            "provisioning.attestation.registration_id",
            format!("{id:?} must be 1-128 lowercase letters, digits or -._:"),
        ))
    }
}

fn parse_manual(
    ctx: &Ctx<'_>,
    raw: &Spanned<RawProvisioning>,
) -> Result<ProvisioningConfig, ConfigError> {
    let p = raw.get_ref();
    if p.global_endpoint.is_some() || p.id_scope.is_some() || p.attestation.is_some() {
        return Err(ctx.err(
            Some(raw.span()),
            "provisioning",
            "global_endpoint, id_scope and attestation need source = \"dps\"",
        ));
    }
    let https_port = parse_https_port(ctx, p)?;
    if let Some(cs) = &p.connection_string {
        if p.iothub_hostname.is_some() || p.device_id.is_some() || p.authentication.is_some() {
            return Err(ctx.err(
                Some(cs.span()),
                "provisioning.connection_string",
                "give either connection_string or iothub_hostname + device_id + [provisioning.authentication], not both",
            ));
        }
        let parsed = ConnectionString::parse(cs.get_ref()).map_err(|e| {
            ctx.err(
                Some(cs.span()),
                "provisioning.connection_string",
                e.to_string(),
            )
        })?;
        if parsed.module_id.is_some() {
            return Err(ctx.err(
                Some(cs.span()),
                "provisioning.connection_string",
                "this is a module connection string; a device connection string is needed",
            ));
        }
        let Some(key) = parsed.shared_access_key else {
            return Err(ctx.err(
                Some(cs.span()),
                "provisioning.connection_string",
                "SharedAccessKey is missing (x509 devices are not supported yet)",
            ));
        };
        return Ok(ProvisioningConfig {
            iothub_hostname: parsed.host_name,
            device_id: parsed.device_id,
            credential: DeviceCredential::SharedKey(key),
            https_port,
        });
    }
    let missing = |key: &str| {
        ctx.err(
            Some(raw.span()),
            key,
            "missing: give connection_string, or iothub_hostname + device_id + [provisioning.authentication]",
        )
    };
    let hub = p
        .iothub_hostname
        .as_ref()
        .ok_or_else(|| missing("provisioning.iothub_hostname"))?;
    let iothub_hostname = HubHostname::new(hub.get_ref().as_str()).map_err(|e| {
        ctx.err(
            Some(hub.span()),
            "provisioning.iothub_hostname",
            e.to_string(),
        )
    })?;
    let dev = p
        .device_id
        .as_ref()
        .ok_or_else(|| missing("provisioning.device_id"))?;
    let device_id = DeviceId::new(dev.get_ref().as_str())
        .map_err(|e| ctx.err(Some(dev.span()), "provisioning.device_id", e.to_string()))?;
    let auth = p
        .authentication
        .as_ref()
        .ok_or_else(|| missing("provisioning.authentication"))?;
    let a = auth.get_ref();
    match a.method.get_ref().as_str() {
        "sas" => {
            for (v, key) in [
                (
                    &a.identity_cert,
                    "provisioning.authentication.identity_cert",
                ),
                (&a.identity_pk, "provisioning.authentication.identity_pk"),
            ] {
                if let Some(v) = v {
                    return Err(ctx.err(Some(v.span()), key, "only with method = \"x509\""));
                }
            }
        }
        "x509" => {
            if let Some(pk) = &a.device_id_pk {
                return Err(ctx.err(
                    Some(pk.span()),
                    "provisioning.authentication.device_id_pk",
                    "only with method = \"sas\"",
                ));
            }
            let file = |v: &Option<Spanned<toml::Value>>, key: &str, what: &str| match v {
                Some(v) => file_uri(ctx, v, key),
                None => Err(ctx.err(
                    Some(auth.span()),
                    key,
                    format!("missing: give {what} = \"file:///path/to/{what}.pem\""),
                )),
            };
            return Ok(ProvisioningConfig {
                iothub_hostname,
                device_id,
                credential: DeviceCredential::X509 {
                    cert: file(
                        &a.identity_cert,
                        "provisioning.authentication.identity_cert",
                        "identity_cert",
                    )?,
                    key: file(
                        &a.identity_pk,
                        "provisioning.authentication.identity_pk",
                        "identity_pk",
                    )?,
                },
                https_port,
            });
        }
        other => {
            return Err(ctx.err(
                Some(a.method.span()),
                "provisioning.authentication.method",
                format!("unknown method {other:?}; expected \"sas\" or \"x509\""),
            ));
        }
    }
    let pk = a.device_id_pk.as_ref().ok_or_else(|| {
        ctx.err(
            Some(auth.span()),
            "provisioning.authentication.device_id_pk",
            "missing: give device_id_pk = { value = \"<base64 key>\" }",
        )
    })?;
    let key = key_ref(ctx, pk, "provisioning.authentication.device_id_pk")?;
    Ok(ProvisioningConfig {
        iothub_hostname,
        device_id,
        credential: DeviceCredential::SharedKey(key),
        https_port,
    })
}

/// A file named as aziot names it (`"file:///abs/path"`) or by a plain
/// path (relative to the config file); aziot's other forms (`pkcs11:` keys,
/// certificates issued by EST or a local CA) are refused by name.
fn file_uri(ctx: &Ctx<'_>, v: &Spanned<toml::Value>, key: &str) -> Result<PathBuf, ConfigError> {
    let refuse = |why: String| Err(ctx.err(Some(v.span()), key, why));
    let Some(text) = v.get_ref().as_str() else {
        return refuse(
            "certificate issuance (a table: method = \"est\" or \"local_ca\") is not supported; \
             give a file: \"file:///path/to/file.pem\""
                .into(),
        );
    };
    let path = match text.split_once("://") {
        None if text.starts_with("pkcs11:") => {
            return refuse("keys in a PKCS#11 token are not supported; give a file URI".into());
        }
        None => text,
        Some(("file", path)) if path.starts_with('/') => path,
        Some(("file", _)) => {
            return refuse(format!(
                "{text:?}: a file URI needs an absolute path (file:///…)"
            ));
        }
        Some((scheme, _)) => {
            return refuse(format!(
                "{scheme}: URIs are not supported; give a file: URI or a path"
            ));
        }
    };
    if path.is_empty() {
        return refuse("empty path".into());
    }
    Ok(ctx.resolve(Path::new(path)))
}
