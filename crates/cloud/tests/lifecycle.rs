//! The verge-cloud executable's life: SIGTERM and SIGINT run its shutdown
//! (listeners stopped, state closed) and exit 0; its data is private.
#![allow(clippy::unwrap_used, missing_docs)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use verge_testkit::cloud::{CloudProc, Config};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn start(dir: &Path) -> CloudProc {
    CloudProc::start(
        Path::new(env!("CARGO_BIN_EXE_verge-cloud")),
        &Config::new(&dir.join("data")).render(),
        dir,
        "info",
    )
}

#[test]
fn sigterm_and_sigint_run_the_shutdown() {
    for signal in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let mut cloud = start(dir.path());
        assert_eq!(cloud.stop(signal, Duration::from_secs(15)), Some(0));
        assert!(cloud.logged("verge-cloud stopped"), "{}", cloud.log());
    }
}

/// The database (whose journal holds device keys) and every other file in
/// the data directory are the owner's only.
#[test]
fn data_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cloud = start(dir.path());
    assert_eq!(cloud.stop("TERM", Duration::from_secs(15)), Some(0));
    assert_eq!(mode(&data), 0o700);
    let mut seen = 0;
    let mut stack = vec![data];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = mode(&p);
            if p.is_dir() {
                assert_eq!(m & 0o077, 0, "{} is {m:o}", p.display());
                stack.push(p);
            } else {
                assert_eq!(m & 0o077, 0, "{} is {m:o}", p.display());
                seen += 1;
            }
        }
    }
    assert!(seen > 3, "only {seen} files");
}
