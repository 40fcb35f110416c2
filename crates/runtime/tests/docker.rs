//! The Docker backend against the Docker Engine on this machine.
//!
//! Needs a running Docker daemon and `/bin/busybox` from the `busybox-static`
//! package: the test image `verge-test/busybox:1` is built locally from it (no
//! registry access). Without Docker these tests fail, unless
//! `VERGE_SKIP_DOCKER_TESTS=1` is set.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use verge_core::time::Timestamp;
use verge_runtime::docker::{DockerConfig, DockerRuntime};
use verge_runtime::{Health, LogOptions, ModuleRuntime, ModuleSpec, ModuleStatus, RuntimeError};

const IMAGE: &str = "verge-test/busybox:1";

/// Docker is reachable (else panics with a clear message), or the tests are
/// to be skipped (returns false).
fn docker_ready() -> bool {
    if std::env::var("VERGE_SKIP_DOCKER_TESTS").as_deref() == Ok("1") {
        eprintln!("VERGE_SKIP_DOCKER_TESTS=1: skipping Docker test");
        return false;
    }
    let out = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "Docker is not reachable (`docker info` failed: {}). Start Docker or set VERGE_SKIP_DOCKER_TESTS=1.",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "the docker CLI cannot be run ({e}). Install Docker or set VERGE_SKIP_DOCKER_TESTS=1."
        ),
    }
    ensure_image();
    true
}

/// Builds `verge-test/busybox:1` from the host's static busybox, once.
fn ensure_image() {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if *built {
        return;
    }
    let exists = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .unwrap()
        .status
        .success();
    if !exists {
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "/bin/busybox is missing: install the busybox-static package (apt-get install -y busybox-static)"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(busybox, dir.path().join("busybox")).unwrap();
        std::fs::write(
            dir.path().join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nENV PATH=/bin\nCMD [\"sh\"]\n",
        )
        .unwrap();
        let out = Command::new("docker")
            .args(["build", "-q", "-t", IMAGE])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "building {IMAGE} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    *built = true;
}

fn suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}-{nanos:x}", std::process::id())
}

/// Unique names for one test, and removal of everything on drop.
struct Fixture {
    id: String,
    network: String,
    containers: Vec<String>,
}

impl Fixture {
    fn new(test: &str) -> Self {
        let id = format!("{test}-{}", suffix());
        Self {
            network: format!("verge-test-net-{id}"),
            id,
            containers: Vec::new(),
        }
    }

    /// A container name that is removed at the end.
    fn name(&mut self, module: &str) -> String {
        let name = format!("verge-test-{module}-{}", self.id);
        self.containers.push(name.clone());
        name
    }

    fn runtime(&self) -> DockerRuntime {
        DockerRuntime::new(DockerConfig {
            network: self.network.clone(),
            owner: format!("verge-test-{}", self.id),
            stop_timeout: Duration::from_secs(1),
            pull_timeout: Duration::from_secs(60),
            // Talk to the same engine as the docker CLI.
            uri: std::env::var("DOCKER_HOST")
                .ok()
                .filter(|h| h.starts_with("unix://") || h.starts_with("tcp://"))
                .unwrap_or_else(|| DockerConfig::default().uri),
            ..DockerConfig::default()
        })
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", "-v", c]).output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }
}

fn spec(name: &str, script: &str) -> ModuleSpec {
    ModuleSpec {
        name: name.to_owned(),
        image: IMAGE.to_owned(),
        create_options: serde_json::json!({ "Cmd": ["sh", "-c", script] }),
        env: BTreeMap::new(),
        labels: BTreeMap::new(),
        workload_socket: None,
        management_socket: None,
    }
}

async fn log_text(rt: &DockerRuntime, name: &str, options: &LogOptions) -> String {
    let mut stream = rt.logs(name, options).await.unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8(out).unwrap()
}

async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn network_exists(name: &str) -> bool {
    Command::new("docker")
        .args(["network", "inspect", name])
        .output()
        .unwrap()
        .status
        .success()
}

#[tokio::test]
async fn container_lifecycle() {
    if !docker_ready() {
        return;
    }
    let mut fx = Fixture::new("life");
    let rt = fx.runtime();
    let name = fx.name("ticker");
    let foreign = fx.name("foreign");
    let out = Command::new("docker")
        .args(["create", "--name", &foreign, IMAGE, "true"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let data = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("ticker.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();

    let mut s = spec(&name, "");
    s.create_options = serde_json::json!({
        "Cmd": ["sh", "-c",
            "echo \"FOO=$FOO BAR=$BAR\"; test -S /run/verge/workload.sock && echo sock-ok; echo hi > /data/out.txt; while true; do echo tick; sleep 0.2; done"],
        "Env": ["BAR=from-options", "FOO=overridden"],
        "HostConfig": { "Binds": [format!("{}:/data", data.path().display())] }
    });
    s.env.insert("FOO".to_owned(), "from-spec".to_owned());
    s.env.insert(
        "IOTEDGE_WORKLOADURI".to_owned(),
        "unix:///run/verge/workload.sock".to_owned(),
    );
    s.labels.insert("version".to_owned(), "1.0".to_owned());
    s.workload_socket = Some(socket.clone());

    rt.create(&s).await.unwrap();
    assert!(network_exists(&fx.network));
    assert!(matches!(
        rt.create(&s).await,
        Err(RuntimeError::AlreadyExists(_))
    ));
    let created = rt.get(&name).await.unwrap();
    assert_eq!(created.status, ModuleStatus::Stopped);
    assert_eq!(created.spec, s);

    rt.start(&name).await.unwrap();
    let running = rt.get(&name).await.unwrap();
    assert_eq!(running.status, ModuleStatus::Running);
    assert!(running.started_at.is_some());
    assert!(running.exit_code.is_none());
    assert!(running.image_id.as_deref().unwrap().starts_with("sha256:"));
    assert!(running.runtime_id.is_some());
    assert!(running.health.is_none());

    eventually(
        "the env and socket lines",
        Duration::from_secs(10),
        || async {
            let text = log_text(&rt, &name, &LogOptions::default()).await;
            text.contains("FOO=from-spec BAR=from-options\n") && text.contains("sock-ok\n")
        },
    )
    .await;
    eventually("the bound file", Duration::from_secs(10), || async {
        std::fs::read_to_string(data.path().join("out.txt")).is_ok_and(|t| t == "hi\n")
    })
    .await;

    let tail = log_text(
        &rt,
        &name,
        &LogOptions {
            tail: Some(1),
            timestamps: true,
            ..Default::default()
        },
    )
    .await;
    let (ts, text) = tail.trim_end().split_once(' ').unwrap();
    Timestamp::parse(ts).unwrap();
    assert_eq!(text, "tick");
    let future = log_text(
        &rt,
        &name,
        &LogOptions {
            since: Some(Timestamp::now().plus_secs(3600)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(future, "");

    let mut follow = rt
        .logs(
            &name,
            &LogOptions {
                follow: true,
                tail: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let line = tokio::time::timeout(Duration::from_secs(5), follow.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&line[..], b"tick\n");

    // Only our containers are listed.
    let list = rt.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].spec, s);
    assert!(matches!(
        rt.get(&foreign).await,
        Err(RuntimeError::NotFound(_))
    ));
    assert!(matches!(
        rt.start(&foreign).await,
        Err(RuntimeError::NotFound(_))
    ));

    // sh as PID 1 ignores SIGTERM: killed after the timeout.
    rt.stop(&name, Duration::from_secs(1)).await.unwrap();
    let stopped = rt.get(&name).await.unwrap();
    assert_ne!(stopped.status, ModuleStatus::Running);
    assert!(stopped.exit_code.is_some());
    assert!(stopped.exited_at.is_some());
    drop(follow);

    rt.restart(&name).await.unwrap();
    assert_eq!(rt.get(&name).await.unwrap().status, ModuleStatus::Running);

    rt.remove(&name).await.unwrap();
    assert!(matches!(
        rt.get(&name).await,
        Err(RuntimeError::NotFound(_))
    ));
    assert!(rt.list().await.unwrap().is_empty());

    let info = rt.info().await.unwrap();
    assert_eq!(info.kind, "docker");
    assert!(!info.version.is_empty());
    assert_eq!(info.os_type, "linux");
}

#[tokio::test]
async fn failing_healthcheck_is_unhealthy() {
    if !docker_ready() {
        return;
    }
    let mut fx = Fixture::new("health");
    let rt = fx.runtime();
    let name = fx.name("sick");
    let mut s = spec(&name, "sleep 300");
    s.create_options = serde_json::json!({
        "Cmd": ["sh", "-c", "sleep 300"],
        "Healthcheck": {
            "Test": ["CMD", "false"],
            "Interval": 200_000_000,
            "Timeout": 1_000_000_000,
            "Retries": 1
        }
    });
    rt.create(&s).await.unwrap();
    rt.start(&name).await.unwrap();
    eventually(
        "health to become unhealthy",
        Duration::from_secs(20),
        || async { rt.get(&name).await.unwrap().health == Some(Health::Unhealthy) },
    )
    .await;
    assert_eq!(rt.get(&name).await.unwrap().status, ModuleStatus::Running);
    rt.remove(&name).await.unwrap();
}

#[tokio::test]
async fn exit_codes_and_missing_images() {
    if !docker_ready() {
        return;
    }
    let mut fx = Fixture::new("exit");
    let rt = fx.runtime();
    let ok = fx.name("ok");
    let bad = fx.name("bad");
    rt.create(&spec(&ok, "exit 0")).await.unwrap();
    rt.create(&spec(&bad, "echo failing >&2; exit 3"))
        .await
        .unwrap();
    rt.start(&ok).await.unwrap();
    rt.start(&bad).await.unwrap();
    eventually("both to exit", Duration::from_secs(10), || async {
        rt.get(&ok).await.unwrap().status != ModuleStatus::Running
            && rt.get(&bad).await.unwrap().status != ModuleStatus::Running
    })
    .await;
    let ok_state = rt.get(&ok).await.unwrap();
    assert_eq!(ok_state.status, ModuleStatus::Stopped);
    assert_eq!(ok_state.exit_code, Some(0));
    let bad_state = rt.get(&bad).await.unwrap();
    assert_eq!(bad_state.status, ModuleStatus::Failed);
    assert_eq!(bad_state.exit_code, Some(3));
    assert_eq!(
        log_text(&rt, &bad, &LogOptions::default()).await,
        "failing\n"
    );

    // Pulling from a registry that is not there fails quickly.
    let t0 = Instant::now();
    let err = rt
        .pull("127.0.0.1:1/verge-test/does-not-exist:1", None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::PullFailed { .. } | RuntimeError::ImageNotFound(_)
        ),
        "{err:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(60));

    // Creating from an image that is not present.
    let mut missing = spec(&fx.name("missing"), "true");
    missing.image = format!("verge-test/not-here-{}:1", fx.id);
    assert!(matches!(
        rt.create(&missing).await,
        Err(RuntimeError::ImageNotFound(_))
    ));
    // A socket that does not exist is refused before Docker makes a directory of it.
    let mut no_socket = spec(&fx.name("nosock"), "true");
    no_socket.workload_socket = Some("/nonexistent/verge/workload.sock".into());
    assert!(matches!(
        rt.create(&no_socket).await,
        Err(RuntimeError::InvalidSpec { .. })
    ));
    // Bad createOptions.
    let mut bad_opts = spec(&fx.name("badopts"), "true");
    bad_opts.create_options = serde_json::json!({"HostConfig": {"Binds": "not-a-list"}});
    assert!(matches!(
        rt.create(&bad_opts).await,
        Err(RuntimeError::InvalidSpec { .. })
    ));
    rt.remove(&ok).await.unwrap();
    rt.remove(&bad).await.unwrap();
}

#[tokio::test]
async fn missing_socket_is_unavailable() {
    // Needs no Docker at all.
    let rt = DockerRuntime::new(DockerConfig {
        uri: "unix:///nonexistent/verge/docker.sock".to_owned(),
        ..DockerConfig::default()
    });
    assert!(matches!(rt.list().await, Err(RuntimeError::Unavailable(_))));
    assert!(matches!(rt.info().await, Err(RuntimeError::Unavailable(_))));
    assert!(matches!(
        rt.pull("busybox", None).await,
        Err(RuntimeError::Unavailable(_))
    ));
}

/// A build context (tar) holding only `Dockerfile`.
fn dockerfile_context(dockerfile: &str) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(dockerfile.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "Dockerfile", dockerfile.as_bytes())
        .unwrap();
    tar.into_inner().unwrap()
}

/// The calls `verge quickstart --docker` makes through the runtime: image
/// builds (in memory and streamed from a file), sizes, removal, and
/// container clean-up by name.
#[tokio::test]
async fn image_builds_and_container_cleanup() {
    if !docker_ready() {
        return;
    }
    let mut fx = Fixture::new("images");
    let rt = fx.runtime();
    let tag = format!("verge-test/built-{}:local", fx.id);
    let from_file = format!("verge-test/built-file-{}:local", fx.id);
    let context = dockerfile_context(&format!("FROM {IMAGE}\nLABEL verge.test=1\n"));

    assert_eq!(rt.image_size(&tag).await.unwrap(), None);
    rt.build_image(&tag, context.clone().into()).await.unwrap();
    assert!(rt.image_size(&tag).await.unwrap().is_some_and(|s| s > 0));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("context.tar");
    std::fs::write(&path, &context).unwrap();
    rt.build_image_from_file(&from_file, &path).await.unwrap();
    assert!(rt.image_size(&from_file).await.unwrap().is_some());

    // The builder's own message comes back.
    let err = rt
        .build_image(
            &format!("verge-test/broken-{}:local", fx.id),
            dockerfile_context("FROM scratch\nRUN [\"/nothing-here\"]\n").into(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("building"), "{err}");

    for r in [&tag, &from_file] {
        assert!(rt.remove_image(r).await.unwrap().is_some());
        assert_eq!(rt.image_size(r).await.unwrap(), None);
    }

    // Containers by name, whoever made them: labels, then stop and remove.
    let name = fx.name("labelled");
    assert_eq!(rt.container_labels(&name).await.unwrap(), None);
    let out = Command::new("docker")
        .args(["run", "-d", "--name", &name, "--label", "who=test", IMAGE])
        .args(["sleep", "60"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let labels = rt.container_labels(&name).await.unwrap().unwrap();
    assert_eq!(labels.get("who").map(String::as_str), Some("test"));
    let started = Instant::now();
    assert!(
        rt.stop_and_remove_container(&name, Duration::from_secs(1))
            .await
            .unwrap()
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(rt.container_labels(&name).await.unwrap(), None);
    assert!(
        !rt.stop_and_remove_container(&name, Duration::from_secs(1))
            .await
            .unwrap()
    );
}
