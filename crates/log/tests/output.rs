//! What a process using `verge_log` writes when its output is not a
//! terminal (the usual case: verged and Docker keep it in files). Each test
//! runs this test binary again as a child with `CHILD` set, so the child's
//! stdout is a pipe and the subscriber is installed fresh.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

const CHILD: &str = "VERGE_LOG_TEST_CHILD";

/// The child: installs the subscriber and logs one line with a field.
#[test]
fn child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    verge_log::init(verge_log::Stream::Stdout);
    // A Verge target: RuntimeLogLevel's verbose levels apply to those only.
    tracing::info!(target: "verge_log::child", answer = 42, "hello from the child");
    tracing::debug!(target: "verge_log::child", "a debug line info hides");
    tracing::debug!(target: "verge_hub::upstream", "the hub's debug line");
    tracing::debug!(target: "rustls::conn", "a dependency's debug line");
}

/// The child's stdout with `env` set.
fn run_child(env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env_remove("NO_COLOR")
        .env_remove("VERGE_LOG_FORMAT")
        .env_remove("RuntimeLogLevel")
        .env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn text_without_colour_when_piped() {
    let out = run_child(&[]);
    let line = out
        .lines()
        .find(|l| l.contains("hello from the child"))
        .unwrap_or_else(|| panic!("no log line in {out:?}"));
    assert!(line.contains("INFO"), "{line:?}");
    assert!(line.contains("answer=42"), "{line:?}");
    assert!(
        !out.contains('\x1b'),
        "escape codes in piped output: {out:?}"
    );
    assert!(!out.contains("a debug line"), "{out:?}");
}

#[test]
fn json_lines() {
    let out = run_child(&[("VERGE_LOG_FORMAT", "json")]);
    let line = out
        .lines()
        .find(|l| l.contains("hello from the child"))
        .unwrap_or_else(|| panic!("no log line in {out:?}"));
    // The test harness prints its own words before the child's line.
    let json = &line[line.find('{').unwrap()..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["level"], "INFO", "{v}");
    assert_eq!(v["fields"]["message"], "hello from the child", "{v}");
    assert_eq!(v["fields"]["answer"], 42, "{v}");
    assert!(!out.contains('\x1b'), "{out:?}");
}

#[test]
fn unknown_format_is_named_and_text_is_used() {
    let out = run_child(&[("VERGE_LOG_FORMAT", "yaml")]);
    assert!(
        out.lines()
            .any(|l| l.contains("WARN") && l.contains("\"yaml\"")),
        "{out:?}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("hello from the child") && l.contains("answer=42")),
        "{out:?}"
    );
}

/// Azure IoT Edge's variable works when RUST_LOG is not set; RUST_LOG wins.
#[test]
fn runtime_log_level_sets_the_level() {
    let out = run_child(&[("RUST_LOG", ""), ("RuntimeLogLevel", "debug")]);
    assert!(out.contains("a debug line"), "{out:?}");
    assert!(out.contains("the hub's debug line"), "{out:?}");
    assert!(!out.contains("a dependency's"), "{out:?}");
    let out = run_child(&[("RUST_LOG", ""), ("RuntimeLogLevel", "warning")]);
    assert!(!out.contains("hello from the child"), "{out:?}");
    let out = run_child(&[("RUST_LOG", "info"), ("RuntimeLogLevel", "debug")]);
    assert!(!out.contains("a debug line"), "{out:?}");
    let out = run_child(&[("RUST_LOG", ""), ("RuntimeLogLevel", "loud")]);
    assert!(
        out.contains("\"loud\"") && out.contains("hello from the child"),
        "{out:?}"
    );
}
