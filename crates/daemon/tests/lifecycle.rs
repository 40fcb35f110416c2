//! The verged executable's life: SIGTERM and SIGINT run its shutdown (the
//! agent it supervises is stopped first) and exit 0.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::Duration;

use verge_testkit::Running;
use verge_testkit::verged::Config;

const KEY: &str = "c2VjcmV0LWRldmljZS1rZXktZm9yLXRlc3RzLTEyMzQ=";

#[test]
fn sigterm_and_sigint_run_the_shutdown() {
    for signal in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let agent = dir.path().join("agent.sh");
        std::fs::write(&agent, "exec sleep 600\n").unwrap();
        let cfg = Config::new(&home)
            .manual(&format!(
                "HostName=hub.example.net;DeviceId=dev1;SharedAccessKey={KEY}"
            ))
            .agent_image(&format!("/bin/sh {}", agent.display()))
            .write(dir.path().join("config.toml"));
        let mut verged = Running::start(
            Command::new(env!("CARGO_BIN_EXE_verged"))
                .arg("--config")
                .arg(&cfg),
        );
        verged.wait_for("agent started");
        assert_eq!(verged.stop(signal, Duration::from_secs(20)), Some(0));
        assert!(
            verged.logged("agent stopped"),
            "{}",
            verged.log().join("\n")
        );
        assert!(
            verged.logged("stop requested"),
            "{}",
            verged.log().join("\n")
        );
    }
}
