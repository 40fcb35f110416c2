//! `verge config mp` and `verge config apply`, run as the real binary.
#![allow(clippy::unwrap_used)]

use std::process::Command;

const CS: &str = "HostName=hub.example.net;DeviceId=edge1;SharedAccessKey=AAECAwQFBgcICQoLDA0ODw==";

fn verge(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn mp_writes_a_config_verged_accepts_and_apply_installs_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    let cfg_s = cfg.to_str().unwrap();
    let (ok, _, err) = verge(&["config", "mp", "-c", CS, "--out", cfg_s]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("connection_string = \"HostName=hub.example.net;DeviceId=edge1;"));
    // The machine's hostname, as iotedge writes it, never "localhost".
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert!(
        text.contains(&format!("hostname = \"{}\"\n", host.trim())),
        "{text}"
    );
    assert!(!text.contains("parent_hostname"), "{text}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A second mp refuses to overwrite.
    let (ok, _, err) = verge(&["config", "mp", "-c", CS, "--out", cfg_s]);
    assert!(!ok);
    assert!(err.contains("--force"), "{err}");

    let target = dir.path().join("etc/verge/config.toml");
    let (ok, out, err) = verge(&[
        "config",
        "apply",
        "-c",
        cfg_s,
        "--target",
        target.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("device edge1 on hub.example.net"), "{out}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), text);
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let (ok, _, err) = verge(&[
        "config",
        "mp",
        "-c",
        "HostName=h;DeviceId=d",
        "--out",
        cfg.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("SharedAccessKey"), "{err}");
    assert!(!cfg.exists());

    let module = format!("{CS};ModuleId=m");
    let (ok, _, err) = verge(&[
        "config",
        "mp",
        "-c",
        &module,
        "--out",
        cfg.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("module connection string"), "{err}");

    std::fs::write(&cfg, "hostname = \"x\"\nbogus_key = 1\n").unwrap();
    let target = dir.path().join("t.toml");
    let (ok, _, err) = verge(&[
        "config",
        "apply",
        "-c",
        cfg.to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("bogus_key"), "{err}");
    assert!(!target.exists(), "a refused config is not installed");
}

#[test]
fn version() {
    let (ok, out, _) = verge(&["version"]);
    assert!(ok);
    assert!(out.starts_with("verge "));
}

#[test]
fn mp_takes_the_gateway_as_parent() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    let cs = format!("{CS};GatewayHostName=parent.local");
    let (ok, _, err) = verge(&["config", "mp", "-c", &cs, "--out", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains("parent_hostname = \"parent.local\""),
        "{text}"
    );
    assert!(
        !text.lines().any(|l| l == "hostname = \"parent.local\""),
        "{text}"
    );
}

#[test]
fn apply_names_the_key_of_a_missing_file_or_a_quoted_number() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    let (ok, _, err) = verge(&["config", "mp", "-c", CS, "--out", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let target = dir.path().join("t.toml");
    let apply = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        verge(&[
            "config",
            "apply",
            "-c",
            cfg.to_str().unwrap(),
            "--target",
            target.to_str().unwrap(),
        ])
    };
    let missing = dir.path().join("no-such-bundle.pem");
    let (ok, _, err) = apply(&text.replacen(
        "hostname",
        &format!("trust_bundle_cert = \"{}\"\nhostname", missing.display()),
        1,
    ));
    assert!(!ok);
    assert!(err.contains("`trust_bundle_cert`"), "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(!target.exists(), "a refused config is not installed");

    let (ok, _, err) = apply(&text.replace(
        "source = \"manual\"\n",
        "source = \"manual\"\nhttps_port = \"443\"\n",
    ));
    assert!(!ok);
    assert!(err.contains("`provisioning.https_port`"), "{err}");
    assert!(!target.exists());
}

#[test]
fn import_converts_an_iot_edge_1_1_config_and_refuses_unknown_settings() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("config.yaml");
    std::fs::write(
        &yaml,
        format!(
            "provisioning:\n  source: \"manual\"\n  device_connection_string: \"{CS}\"\n\
             agent:\n  name: \"edgeAgent\"\n  type: \"docker\"\n  env: {{}}\n  config:\n\
             \x20   image: \"mcr.microsoft.com/azureiotedge-agent:1.1\"\n    auth: {{}}\n\
             hostname: \"edge1.local\"\nhomedir: \"/var/lib/iotedge\"\n"
        ),
    )
    .unwrap();
    let out = dir.path().join("verge.toml");
    let (ok, stdout, err) = verge(&[
        "config",
        "import",
        "-i",
        yaml.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("verge config apply"), "{stdout}");
    assert!(err.contains("note: homedir"), "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("hostname = \"edge1.local\""), "{text}");
    assert!(text.contains("DeviceId=edge1"), "{text}");

    std::fs::write(&yaml, "hostname: x\nsomething_new: 1\n").unwrap();
    let out2 = dir.path().join("verge2.toml");
    let (ok, _, err) = verge(&[
        "config",
        "import",
        "-i",
        yaml.to_str().unwrap(),
        "-o",
        out2.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("something_new: unknown setting"), "{err}");
    assert!(!out2.exists());
}

/// An aziot config provisioned through DPS with a symmetric key imports and
/// applies (verged registers at its first start); before, import refused
/// DPS and apply refused any DPS config not registered yet.
#[test]
fn an_aziot_dps_config_imports_and_applies() {
    let dir = tempfile::tempdir().unwrap();
    let aziot = dir.path().join("config.toml");
    std::fs::write(
        &aziot,
        "hostname = \"edge1.local\"\n[provisioning]\nsource = \"dps\"\n\
         global_endpoint = \"https://global.azure-devices-provisioning.net/\"\n\
         id_scope = \"0ne00AB\"\n[provisioning.attestation]\nmethod = \"symmetric_key\"\n\
         registration_id = \"edge1\"\nsymmetric_key = { value = \"AAECAwQFBgcICQoLDA0ODw==\" }\n",
    )
    .unwrap();
    let out = dir.path().join("verge.toml");
    let (ok, _, err) = verge(&[
        "config",
        "import",
        "-i",
        aziot.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("source = \"dps\""), "{text}");
    let target = dir.path().join("etc/verge/config.toml");
    let (ok, stdout, err) = verge(&[
        "config",
        "apply",
        "-c",
        out.to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("registers through DPS"), "{stdout}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), text);
}

/// `verge … | head`: a reader closing the pipe early ends the CLI quietly
/// (exit 141, as after SIGPIPE), not with a panic and a backtrace.
#[test]
fn closed_stdout_ends_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_verge"))
        .arg("check-list")
        .stdout(writer)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
