//! The support bundle's building blocks: secrets scrubbed out of any text
//! and module environment, module names as file names, the `.tar.gz`
//! writer. `verge support-bundle` and the agent's `UploadSupportBundle`
//! build their bundles with these, so both redact the same way.

use std::time::SystemTime;

use anyhow::Context as _;

/// What a secret is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Names whose values are secrets wherever they appear (config keys,
/// environment variables); compared lowercase, as substrings.
const SECRET_NAMES: &[&str] = &[
    "password",
    "secret",
    "token",
    "connectionstring",
    "connection_string",
    "sharedaccesskey",
    "symmetric_key",
    "device_id_pk",
    "accesskey",
    "apikey",
    "api_key",
];

/// Whether a config key or environment variable name looks like a secret.
pub fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    SECRET_NAMES.iter().any(|s| n.contains(s))
}

/// Removes the values of `SharedAccessKey=…` (connection strings) and
/// `sig=…` (SAS tokens) from any text, keeping the rest readable. The key
/// name goes too, so a search for it in the bundle finds nothing.
pub fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let lower = rest.to_ascii_lowercase();
        let hit = ["sharedaccesskey=", "sig="]
            .iter()
            .filter_map(|pat| {
                lower
                    .match_indices(pat)
                    // `sig=` only as a query parameter, not inside another word.
                    .find(|(i, _)| {
                        *pat != "sig="
                            || *i == 0
                            || matches!(lower.as_bytes()[i - 1], b'&' | b'?' | b' ' | b';')
                    })
                    .map(|(i, _)| (i, pat.len()))
            })
            .min();
        let Some((at, len)) = hit else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..at]);
        out.push_str(if len == "sig=".len() { "sig=" } else { "" });
        out.push_str(REDACTED);
        let value_start = at + len;
        let value_len = rest[value_start..]
            .find(|c: char| c == ';' || c == '&' || c == '"' || c == '\'' || c.is_whitespace())
            .unwrap_or(rest.len() - value_start);
        rest = &rest[value_start + value_len..];
    }
}

/// Module details (the management API's `GET /modules` shape) with secret-looking environment values removed.
pub fn redact_modules(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(mods) = v.get_mut("modules").and_then(|m| m.as_array_mut()) {
        for m in mods {
            if let Some(env) = m.pointer_mut("/config/env").and_then(|e| e.as_array_mut()) {
                for e in env {
                    let secret = e["key"].as_str().is_some_and(is_secret_name);
                    if secret {
                        e["value"] = serde_json::Value::String(REDACTED.to_owned());
                    }
                }
            }
        }
    }
    v
}

/// A module name as a file name (no path separators).
pub fn safe_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes the files as a gzip-compressed tar.
pub fn write_tar_gz(files: &[(String, Vec<u8>)], out: impl std::io::Write) -> anyhow::Result<()> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mtime = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(mtime);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data.as_slice())
            .with_context(|| format!("adding {name}"))?;
    }
    let gz = tar.into_inner().context("finishing the archive")?;
    let mut out = gz.finish().context("finishing the compression")?;
    out.flush().context("writing the archive")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn scrubs_keys_and_signatures() {
        let cs = format!("HostName=h;DeviceId=d;SharedAccessKey={KEY}");
        assert_eq!(scrub(&cs), "HostName=h;DeviceId=d;<redacted>");
        let cs2 = format!("SharedAccessKey={KEY};HostName=h");
        assert_eq!(scrub(&cs2), "<redacted>;HostName=h");
        let tok = "SharedAccessSignature sr=h%2Fdevices%2Fd&sig=abc%3D&se=1";
        assert_eq!(
            scrub(tok),
            "SharedAccessSignature sr=h%2Fdevices%2Fd&sig=<redacted>&se=1"
        );
        assert_eq!(scrub("config=1 design=2"), "config=1 design=2");
        assert_eq!(scrub("sharedaccesskey=x y"), "<redacted> y");
    }

    #[test]
    fn redacts_module_env() {
        let v = serde_json::json!({"modules": [{"config": {"env": [
            {"key": "IOTEDGE_MODULEID", "value": "m"},
            {"key": "DB_PASSWORD", "value": "x"},
        ]}}]});
        let r = redact_modules(v);
        assert_eq!(r["modules"][0]["config"]["env"][0]["value"], "m");
        assert_eq!(r["modules"][0]["config"]["env"][1]["value"], REDACTED);
    }

    #[test]
    fn safe_names() {
        assert_eq!(safe_name("../x/$edgeHub"), ".._x__edgeHub");
    }

    #[test]
    fn tar_gz_round_trip() {
        let mut out = Vec::new();
        write_tar_gz(&[("a/b.txt".into(), b"hello".to_vec())], &mut out).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(out.as_slice()));
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str(), Some("a/b.txt"));
        let mut s = String::new();
        std::io::Read::read_to_string(&mut e, &mut s).unwrap();
        assert_eq!(s, "hello");
    }
}
