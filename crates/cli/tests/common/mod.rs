//! Shared by the integration tests: building the sibling binaries with the
//! same cargo, target directory and profile as the test itself.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `<target>/<profile>` of this test binary (it runs from `<target>/<profile>/deps/`).
pub fn profile_dir() -> PathBuf {
    verge_testkit::profile_dir()
}

/// Builds `packages` (`-p` each) and returns the profile directory holding
/// their binaries (see [`verge_testkit::build`]).
pub fn build(packages: &[&str]) -> PathBuf {
    verge_testkit::build(packages)
}
