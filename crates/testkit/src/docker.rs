//! Docker for tests: the engine and the locally built test image are
//! required (a silently skipped test proves nothing) unless
//! `VERGE_SKIP_DOCKER_TESTS=1`; what a test made is removed on drop.

use std::process::Command;

/// The test image `scripts/test-images.sh` builds from the host's static
/// busybox (nothing can be pulled).
pub const TEST_IMAGE: &str = "verge-test/busybox:1";

fn ok(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `false` when `VERGE_SKIP_DOCKER_TESTS=1` (the test returns early);
/// panics when the engine or [`TEST_IMAGE`] is missing.
pub fn ready() -> bool {
    if std::env::var("VERGE_SKIP_DOCKER_TESTS").as_deref() == Ok("1") {
        eprintln!("VERGE_SKIP_DOCKER_TESTS=1: skipping Docker test");
        return false;
    }
    assert!(
        ok(&["info"]),
        "Docker is not reachable (set VERGE_SKIP_DOCKER_TESTS=1 to skip Docker tests)"
    );
    assert!(
        ok(&["image", "inspect", TEST_IMAGE]),
        "{TEST_IMAGE} is missing: ./scripts/test.sh builds it (scripts/test-images.sh)"
    );
    true
}

/// A test's containers (by the `net.verge.owner` label), network and image
/// tags, removed when dropped — also when the test fails half-way.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// The owner label of the runtime the test made.
    pub owner: String,
    /// The module network the test's runtime used.
    pub network: String,
    /// Image tags the test made.
    pub images: Vec<String>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let filter = format!("label=net.verge.owner={}", self.owner);
        let ids = Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for id in ids.split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", "-v", id]).output();
        }
        for image in &self.images {
            let _ = Command::new("docker").args(["rmi", image]).output();
        }
        if !self.network.is_empty() {
            let _ = Command::new("docker")
                .args(["network", "rm", &self.network])
                .output();
        }
    }
}
