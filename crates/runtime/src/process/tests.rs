//! The process backend's unit tests.

use super::output::{LogSink, format_line, parse_line};
use super::*;
use std::collections::BTreeMap;

fn spec(image: &str, opts: serde_json::Value) -> ModuleSpec {
    ModuleSpec {
        name: "m".into(),
        image: image.into(),
        create_options: opts,
        env: BTreeMap::new(),
        labels: BTreeMap::new(),
        workload_socket: None,
        management_socket: None,
    }
}

#[test]
fn command_line_from_image_and_cmd() {
    let cl = command_line(&spec(
        "/bin/sh  -c",
        serde_json::json!({"Cmd": ["echo hi"], "WorkingDir": "/tmp", "Env": ["X=1"]}),
    ))
    .unwrap();
    assert_eq!(cl.program, "/bin/sh");
    assert_eq!(cl.args, vec!["-c", "echo hi"]);
    assert_eq!(cl.working_dir.as_deref(), Some("/tmp"));
    assert!(command_line(&spec("", serde_json::json!({}))).is_err());
    assert!(command_line(&spec("/bin/true", serde_json::json!({"Cmd": [1]}))).is_err());
    assert!(command_line(&spec("/bin/true", serde_json::json!([]))).is_err());
}

#[test]
fn container_images_and_ignored_create_options() {
    for image in [
        "mcr.microsoft.com/azureiotedge-simulated-temperature-sensor:1.5",
        "nginx:1.27",
        "me/app",
        "app@sha256:00",
    ] {
        assert!(looks_like_container_image(image), "{image}");
    }
    for program in ["/usr/bin/app", "./app", "python3"] {
        assert!(!looks_like_container_image(program), "{program}");
    }
    let ignored = ignored_create_options(&serde_json::json!({
        "Cmd": ["x"],
        "WorkingDir": "/tmp",
        "Env": ["A=1"],
        "HostConfig": {"PortBindings": {}, "Binds": [], "Privileged": null},
        "ExposedPorts": {},
    }));
    assert_eq!(
        ignored,
        vec![
            "Env",
            "ExposedPorts",
            "HostConfig.Binds",
            "HostConfig.PortBindings"
        ]
    );
    assert!(ignored_create_options(&serde_json::json!({"Cmd": ["x"]})).is_empty());
}

#[tokio::test]
async fn pulling_a_container_image_says_this_backend_runs_executables() {
    let dir = tempfile::tempdir().unwrap();
    let rt = ProcessRuntime::open(ProcessConfig::new(dir.path()))
        .await
        .unwrap();
    let e = rt
        .pull("mcr.microsoft.com/azureiotedge-agent:1.5", None)
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("the process backend runs executables"),
        "{text}"
    );
    assert!(
        text.contains("`mcr.microsoft.com/azureiotedge-agent:1.5` looks like a container image"),
        "{text}"
    );
    assert!(matches!(
        rt.pull("/no/such/program", None).await,
        Err(RuntimeError::ImageNotFound(_))
    ));
}

#[test]
fn names_are_checked() {
    assert!(validate_name("edgeHub").is_ok());
    assert!(validate_name("").is_err());
    assert!(validate_name("..").is_err());
    assert!(validate_name("a/b").is_err());
}

#[test]
fn log_lines_round_trip() {
    let l = parse_line(b"2026-01-02T03:04:05.678Z O hello world").unwrap();
    assert_eq!(&l.msg[..], b"hello world");
    assert_eq!(l.ts.to_iso8601(), "2026-01-02T03:04:05.678Z");
    assert_eq!(&format_line(&l, false)[..], b"hello world\n");
    assert_eq!(
        &format_line(&l, true)[..],
        b"2026-01-02T03:04:05.678Z hello world\n"
    );
    let empty = parse_line(b"2026-01-02T03:04:05.678Z E").unwrap();
    assert!(empty.msg.is_empty());
    assert!(parse_line(b"garbage").is_none());
}

#[tokio::test]
async fn logs_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let sink = LogSink::new(dir.path().to_path_buf(), 100, 3);
    for i in 0..30 {
        sink.write(b'O', format!("line {i:04}").into_bytes()).await;
    }
    assert!(sink.path(1).exists());
    assert!(sink.path(2).exists());
    assert!(!sink.path(3).exists());
    let lines = sink.read_all().await;
    assert!(lines.len() < 30);
    assert_eq!(&lines.last().unwrap().msg[..], b"line 0029");
    let total: u64 = (0..3)
        .map(|i| std::fs::metadata(sink.path(i)).unwrap().len())
        .sum();
    assert!(total <= 300);
}

#[tokio::test]
async fn output_log_captures_a_child_and_ends_followers() {
    let dir = tempfile::tempdir().unwrap();
    let log = OutputLog::new(dir.path().join("logs"), 1 << 20, 2);
    let mut child = tokio::process::Command::new("/bin/sh")
        .args(["-c", "echo out; echo err >&2; sleep 0.3; echo late"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = log.capture(child.stdout.take(), child.stderr.take()).await;
    let follow = log
        .stream(&LogOptions {
            follow: true,
            ..LogOptions::default()
        })
        .await
        .unwrap();
    child.wait().await.unwrap();
    run.finish().await;
    // The follower ends with the run, having seen every line.
    let got: Vec<Bytes> = tokio::time::timeout(Duration::from_secs(10), follow.collect::<Vec<_>>())
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let text: String = got.iter().map(|b| String::from_utf8_lossy(b)).collect();
    assert!(text.contains("late\n"), "{text}");
    let all = log.stream(&LogOptions::default()).await.unwrap();
    let n = all.collect::<Vec<_>>().await.len();
    assert_eq!(n, 3);
    assert!(dir.path().join("logs/output.log").exists());
}
