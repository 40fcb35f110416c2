//! Shared by the integration tests: building the sibling binaries with the
//! same cargo, target directory and profile as the test itself.

use std::path::PathBuf;

/// Builds `packages` (`-p` each) and returns the profile directory holding
/// their binaries (see [`verge_testkit::build`]).
pub fn build(packages: &[&str]) -> PathBuf {
    verge_testkit::build(packages)
}
