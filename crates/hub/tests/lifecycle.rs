//! The verge-hub executable's life: it starts over damaged side files
//! (moving them aside), keeps its storage private, and stops cleanly on
//! SIGTERM as on SIGINT.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use verge_testkit::Running;

/// The hub's grace period is 5 s; allow for a slow machine.
const STOP_LIMIT: Duration = Duration::from_secs(15);

/// Starts the real verge-hub on `config`, outside any edge environment.
fn start(config: &Path) -> Running {
    Running::start(
        Command::new(env!("CARGO_BIN_EXE_verge-hub"))
            .arg("--config")
            .arg(config)
            .env_remove("IOTEDGE_WORKLOADURI"),
    )
}

fn write_config(pki: &common::Pki, storage: &Path) -> std::path::PathBuf {
    common::config(pki, storage, "127.0.0.1:0", "127.0.0.1:0");
    pki.dir.path().join("hub.toml")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn damaged(dir: &Path, name: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{name}.damaged-")))
        .collect()
}

/// SIGTERM (what docker stop and verged send) runs the shutdown and exits
/// 0, as SIGINT does. Before the fix SIGTERM killed the hub outright.
#[test]
fn sigterm_and_sigint_run_the_shutdown() {
    for signal in ["TERM", "INT"] {
        let pki = common::pki();
        let storage = pki.dir.path().join("storage");
        let config = write_config(&pki, &storage);
        let mut hub = start(&config);
        hub.wait_for("verge-hub listening");
        assert_eq!(
            hub.stop(signal, STOP_LIMIT),
            Some(0),
            "{}",
            hub.log().join("\n")
        );
        assert!(
            hub.log().iter().any(|l| l.contains("verge-hub stopped")),
            "SIG{signal}: {}",
            hub.log().join("\n")
        );
    }
}

/// An empty or corrupt sessions or twins file no longer stops the hub: it is
/// moved aside with a warning naming it, and the hub starts.
#[test]
fn damaged_side_files_are_moved_aside() {
    for content in ["", "{\"edge1/modA\": [\"devices/edge1/"] {
        let pki = common::pki();
        let storage = pki.dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        std::fs::write(storage.join("sessions.json"), content).unwrap();
        std::fs::write(storage.join("twins.json"), content).unwrap();
        let config = write_config(&pki, &storage);
        let mut hub = start(&config);
        hub.wait_for("verge-hub listening");
        for name in ["sessions.json", "twins.json"] {
            assert!(
                hub.log()
                    .iter()
                    .any(|l| l.contains("damaged file moved aside") && l.contains(name)),
                "{name}: {}",
                hub.log().join("\n")
            );
            assert!(!storage.join(name).exists());
            assert_eq!(damaged(&storage, name).len(), 1, "{name}");
        }
        assert_eq!(hub.stop("TERM", STOP_LIMIT), Some(0));
    }
}

/// The storage directory, the store inside it and the hub's side files are
/// the owner's only.
#[test]
fn storage_is_private() {
    let pki = common::pki();
    let storage = pki.dir.path().join("storage");
    // Also when the directory already existed with a wider mode.
    std::fs::create_dir_all(storage.join("store")).unwrap();
    std::fs::set_permissions(&storage, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        storage.join("store"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let config = write_config(&pki, &storage);
    let mut hub = start(&config);
    hub.wait_for("verge-hub listening");
    assert_eq!(hub.stop("TERM", STOP_LIMIT), Some(0));
    assert_eq!(mode(&storage), 0o700);
    assert_eq!(mode(&storage.join("store")), 0o700);
    assert_eq!(mode(&storage.join("sessions")), 0o700);
    let twins = storage.join("twins.json");
    if twins.exists() {
        assert_eq!(mode(&twins), 0o600);
    }
}
