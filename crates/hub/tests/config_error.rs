//! A bad configuration file makes `verge-hub` say what is wrong in one
//! place and exit with the config error code, never print a backtrace
//! (also with `RUST_BACKTRACE=1`).
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

use std::process::{Command, Stdio};

#[test]
fn config_error_is_one_message_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("hub.toml");
    std::fs::write(&cfg, "no_such_key = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_verge-hub"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .env_remove("IOTEDGE_DEVICEID")
        .env_remove("IOTEDGE_WORKLOADURI")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("invalid configuration"), "{err}");
    assert!(err.contains("no_such_key"), "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    assert!(err.lines().count() < 12, "{err}");

    // A file that cannot be read is a config error too.
    let out = Command::new(env!("CARGO_BIN_EXE_verge-hub"))
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("missing.toml"), "{err}");
}
