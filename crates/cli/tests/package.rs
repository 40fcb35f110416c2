//! The Debian package (`scripts/package-deb.sh`, `packaging/`): built from
//! this build's binaries and installed into a copy of a Debian root made by
//! debootstrap (`scripts/deb-root.sh`; `./scripts/test.sh` makes it), where
//! `package/check-install.sh` checks files, the systemd unit, the
//! `verge config mp` / `apply` flow, verged running its agent, removal and purge.
//! Needs root (chroot, mounts in a private mount namespace) unless
//! VERGE_SKIP_PACKAGE_TESTS=1.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn deb_root() -> PathBuf {
    std::env::var_os("VERGE_DEB_ROOT").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/deb-root"),
        PathBuf::from,
    )
}

#[test]
fn deb_installs_configures_runs_and_purges() {
    if std::env::var("VERGE_SKIP_PACKAGE_TESTS").as_deref() == Ok("1") {
        eprintln!("VERGE_SKIP_PACKAGE_TESTS=1: skipping the package test");
        return;
    }
    let root = deb_root();
    assert!(
        root.join("usr/bin/dpkg").exists(),
        "no Debian root at {} (scripts/deb-root.sh makes it; or set VERGE_SKIP_PACKAGE_TESTS=1)",
        root.display()
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "the package test needs root (chroot); set VERGE_SKIP_PACKAGE_TESTS=1 to skip it"
    );
    let bin_dir = common::build(&["verge-edge", "verge-cli"]);
    let tmp = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(repo.join("scripts/package-deb.sh"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(tmp.path())
        .arg("--fast")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(deb.is_file(), "{}", deb.display());
    let info = Command::new("dpkg-deb")
        .arg("--field")
        .arg(&deb)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("Package: verge"), "{info}");
    assert!(info.contains("Depends: libc6"), "{info}");

    // A throwaway copy: the check installs, runs and purges in it.
    let copy = tmp.path().join("root");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&root)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(cp.success());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/package/check-install.sh");
    // A mount namespace of its own: /proc and /dev mounted into the copy go
    // away with it, whatever happens.
    // A network namespace too: the agent verged starts serves its metrics
    // on 0.0.0.0:9600, which must not reach this machine's network.
    let out = Command::new("unshare")
        .arg("--mount")
        .arg("--net")
        .arg("--propagation")
        .arg("private")
        .arg(&script)
        .arg(&deb)
        .arg(&copy)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for step in [
        "installed: files, modes and unit ok",
        "config flow ok",
        "verged ran the agent ok",
        "remove and purge ok",
    ] {
        assert!(text.contains(step), "{step}:\n{text}");
    }
}
