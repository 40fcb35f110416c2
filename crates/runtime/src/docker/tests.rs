//! The Docker backend's unit tests (container bodies, names, images; no engine).

use super::*;
use bollard::container::LogOutput;

fn spec() -> ModuleSpec {
    ModuleSpec {
        name: "filter".into(),
        image: "example/filter:1".into(),
        create_options: serde_json::json!({
            "Env": ["A=1", "B=2"],
            "ExposedPorts": {"80/tcp": {}},
            "Labels": {"x": "y"},
            "HostConfig": {"Binds": ["/data:/data"], "PortBindings": {"80/tcp": [{"HostPort": "8080"}]}}
        }),
        env: BTreeMap::from([
            ("B".into(), "3".into()),
            (
                "IOTEDGE_WORKLOADURI".into(),
                "unix:///var/run/iotedge/workload.sock".into(),
            ),
        ]),
        labels: BTreeMap::from([("version".into(), "1.0".into())]),
        workload_socket: Some("/var/lib/verge/mnt/filter.sock".into()),
        management_socket: None,
    }
}

#[test]
fn body_merges_options_and_spec() {
    let body = container_body(&spec(), "verge-net", "verged").unwrap();
    assert_eq!(body.image.as_deref(), Some("example/filter:1"));
    let env = body.env.unwrap();
    assert!(env.contains(&"A=1".to_owned()));
    assert!(env.contains(&"B=3".to_owned()));
    assert!(!env.contains(&"B=2".to_owned()));
    let labels = body.labels.unwrap();
    assert_eq!(labels.get("x").map(String::as_str), Some("y"));
    assert_eq!(labels.get("version").map(String::as_str), Some("1.0"));
    assert_eq!(labels.get(OWNER_LABEL).map(String::as_str), Some("verged"));
    let back: ModuleSpec = serde_json::from_str(&labels[SPEC_LABEL]).unwrap();
    assert_eq!(back, spec());
    let host = body.host_config.unwrap();
    assert_eq!(
        host.binds.unwrap(),
        vec![
            "/data:/data".to_owned(),
            "/var/lib/verge/mnt/filter.sock:/var/run/iotedge/workload.sock".to_owned()
        ]
    );
    assert!(host.port_bindings.is_some());
    assert_eq!(host.network_mode.as_deref(), Some("verge-net"));
    assert_eq!(body.exposed_ports.unwrap(), vec!["80/tcp".to_owned()]);
    assert!(
        body.networking_config
            .unwrap()
            .endpoints_config
            .unwrap()
            .contains_key("verge-net")
    );
}

#[test]
fn edge_hub_answers_to_the_device_hostname() {
    let aliases = |s: &ModuleSpec| {
        container_body(s, "verge-net", "verged")
            .unwrap()
            .networking_config
            .unwrap()
            .endpoints_config
            .unwrap()["verge-net"]
            .aliases
            .clone()
    };
    let mut s = spec();
    s.env
        .insert("EdgeDeviceHostName".into(), "edge1.local".into());
    assert_eq!(aliases(&s), None, "only edgeHub gets the alias");
    s.name = "edgeHub".into();
    assert_eq!(aliases(&s), Some(vec!["edge1.local".to_owned()]));
    // An alias of the user's own is kept, and not doubled.
    s.create_options = serde_json::json!({"NetworkingConfig": {"EndpointsConfig":
        {"verge-net": {"Aliases": ["hub", "edge1.local"]}}}});
    assert_eq!(
        aliases(&s),
        Some(vec!["hub".to_owned(), "edge1.local".to_owned()])
    );
}

#[test]
fn user_network_mode_is_kept() {
    let mut s = spec();
    s.create_options = serde_json::json!({"HostConfig": {"NetworkMode": "host"}});
    let body = container_body(&s, "verge-net", "verged").unwrap();
    assert_eq!(
        body.host_config.unwrap().network_mode.as_deref(),
        Some("host")
    );
    assert!(body.networking_config.is_none());
    s.create_options = serde_json::json!("nope");
    assert!(matches!(
        container_body(&s, "n", "o"),
        Err(RuntimeError::InvalidSpec { .. })
    ));
}

#[test]
fn status_mapping() {
    use ContainerStateStatusEnum as S;
    assert_eq!(map_status(Some(S::RUNNING), Some(0)), ModuleStatus::Running);
    assert_eq!(map_status(Some(S::CREATED), Some(0)), ModuleStatus::Stopped);
    assert_eq!(map_status(Some(S::PAUSED), None), ModuleStatus::Stopped);
    assert_eq!(map_status(Some(S::RESTARTING), None), ModuleStatus::Stopped);
    assert_eq!(map_status(Some(S::EXITED), Some(0)), ModuleStatus::Stopped);
    assert_eq!(map_status(Some(S::EXITED), Some(137)), ModuleStatus::Failed);
    assert_eq!(map_status(Some(S::REMOVING), Some(1)), ModuleStatus::Failed);
    assert_eq!(map_status(Some(S::DEAD), Some(0)), ModuleStatus::Dead);
    assert_eq!(map_status(Some(S::EMPTY), None), ModuleStatus::Unknown);
    assert_eq!(map_status(None, None), ModuleStatus::Unknown);
}

#[test]
fn default_tags() {
    assert_eq!(with_default_tag("busybox"), "busybox:latest");
    assert_eq!(with_default_tag("a/b:1"), "a/b:1");
    assert_eq!(
        with_default_tag("127.0.0.1:5000/b"),
        "127.0.0.1:5000/b:latest"
    );
    assert_eq!(with_default_tag("b@sha256:00"), "b@sha256:00");
}

#[test]
fn frames_become_lines() {
    let chunk = LogOutput::StdOut {
        message: Bytes::from_static(b"2026-01-01T00:00:01.500000000Z hello\n"),
    };
    let lines = frame_lines(chunk.clone(), None, None, false);
    assert_eq!(lines, vec![Bytes::from_static(b"hello\n")]);
    let lines = frame_lines(chunk.clone(), None, None, true);
    assert_eq!(
        lines,
        vec![Bytes::from_static(
            b"2026-01-01T00:00:01.500000000Z hello\n"
        )]
    );
    let after = Timestamp::parse("2026-01-01T00:00:01.600Z").ok();
    assert!(frame_lines(chunk.clone(), after, None, false).is_empty());
    let before = Timestamp::parse("2026-01-01T00:00:01.500Z").ok();
    assert!(frame_lines(chunk, None, before, false).is_empty());
}

#[test]
fn pull_progress_logs_status_changes_only() {
    let info = |id: &str, status: &str, current: i64| CreateImageInfo {
        id: Some(id.to_owned()),
        status: Some(status.to_owned()),
        progress_detail: Some(bollard::models::ProgressDetail {
            current: Some(current),
            total: Some(100),
        }),
        ..Default::default()
    };
    let mut p = PullLog::default();
    let lines: Vec<Option<String>> = [
        info("1", "Pulling from verge/busy", 0),
        info("a1", "Pulling fs layer", 0),
        info("a1", "Downloading", 10),
        info("a1", "Downloading", 60),
        info("b2", "Downloading", 5),
        info("a1", "Pull complete", 100),
        info("", "Digest: sha256:00", 0),
        info("a1", "", 0),
    ]
    .iter()
    .map(|i| p.line(i))
    .collect();
    let expect = [
        Some("1: Pulling from verge/busy"),
        Some("a1: Pulling fs layer"),
        Some("a1: Downloading"),
        None,
        Some("b2: Downloading"),
        Some("a1: Pull complete"),
        Some("Digest: sha256:00"),
        None,
    ];
    assert_eq!(
        lines,
        expect.map(|l| l.map(str::to_owned)).to_vec(),
        "one line per status change"
    );
}

#[test]
fn errors_are_classified() {
    let e = BollardError::DockerResponseServerError {
        status_code: 404,
        message: "pull access denied".into(),
    };
    assert!(matches!(pull_error("x", e), RuntimeError::ImageNotFound(_)));
    let e = BollardError::DockerResponseServerError {
        status_code: 500,
        message: "connection refused".into(),
    };
    assert!(matches!(
        pull_error("x", e),
        RuntimeError::PullFailed { .. }
    ));
    let e = BollardError::SocketNotFoundError("/nope".into());
    assert!(matches!(pull_error("x", e), RuntimeError::Unavailable(_)));
}
