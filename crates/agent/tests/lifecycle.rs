//! The verge-agent executable's life: SIGTERM (what verged and docker stop
//! send) and SIGINT run its shutdown and exit 0.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::Duration;

use verge_testkit::Running;

#[test]
fn sigterm_and_sigint_run_the_shutdown() {
    for signal in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let mut agent = Running::start(
            Command::new(env!("CARGO_BIN_EXE_verge-agent"))
                .arg("--storage")
                .arg(dir.path().join("storage"))
                .args(["--runtime", "process", "--no-twin", "--interval-ms", "100"])
                .args(["--metrics-listen", "127.0.0.1:0"])
                .arg("--state-dir")
                .arg(dir.path().join("modules"))
                .env_remove("IOTEDGE_MANAGEMENTURI"),
        );
        agent.wait_for("verge-agent started");
        assert_eq!(agent.stop(signal, Duration::from_secs(15)), Some(0));
        assert!(
            agent.logged("verge-agent stopped"),
            "{}",
            agent.log().join("\n")
        );
    }
}
