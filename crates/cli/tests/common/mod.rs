//! Shared by the integration tests: building the sibling binaries with the
//! same cargo, target directory and profile as the test itself.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `<target>/<profile>` of this test binary (it runs from `<target>/<profile>/deps/`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// Builds `packages` (`-p` each) and returns the profile directory holding
/// their binaries.
pub fn build(packages: &[&str]) -> PathBuf {
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().unwrap().to_path_buf();
    let profile = profile_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut cmd = Command::new(env!("CARGO"));
    // Without what `cargo test` set for this test (CARGO_PKG_*, OUT_DIR, …):
    // build scripts that watch them (ring's) would run again, and all that
    // depends on them would be compiled again, on every test run and again
    // by the next `cargo build` from a shell.
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_CRATE_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "OUT_DIR",
        ]
        .contains(&name.as_ref())
            || name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
        {
            cmd.env_remove(&k);
        }
    }
    cmd.args(["build", "--quiet"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    cmd.arg("--target-dir")
        .arg(&target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(1200) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("building {packages:?} took more than 20 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "building {packages:?} failed: {status}");
    profile_dir
}
