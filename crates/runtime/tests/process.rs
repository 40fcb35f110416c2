//! The process backend against real child processes (`/bin/sh`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use verge_core::time::Timestamp;
use verge_runtime::process::{ProcessConfig, ProcessRuntime};
use verge_runtime::{LogOptions, ModuleRuntime, ModuleSpec, ModuleStatus, RuntimeError};

fn sh(name: &str, script: &str) -> ModuleSpec {
    ModuleSpec {
        name: name.to_owned(),
        image: "/bin/sh -c".to_owned(),
        create_options: serde_json::json!({ "Cmd": [script] }),
        env: BTreeMap::new(),
        labels: BTreeMap::from([("version".to_owned(), "1.0".to_owned())]),
        workload_socket: None,
        management_socket: None,
    }
}

async fn runtime(dir: &Path) -> ProcessRuntime {
    let mut config = ProcessConfig::new(dir);
    config.stop_timeout = Duration::from_secs(5);
    ProcessRuntime::open(config).await.unwrap()
}

async fn log_text(rt: &ProcessRuntime, name: &str, options: &LogOptions) -> String {
    let mut stream = rt.logs(name, options).await.unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8(out).unwrap()
}

/// Polls `check` every 50 ms for up to 10 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn wait_logged(rt: &ProcessRuntime, name: &str, needle: &str) {
    eventually(&format!("{name} to log {needle:?}"), || async {
        log_text(rt, name, &LogOptions::default())
            .await
            .contains(needle)
    })
    .await;
}

async fn wait_exit(rt: &ProcessRuntime, name: &str) {
    eventually(&format!("{name} to exit"), || async {
        rt.get(name).await.unwrap().status != ModuleStatus::Running
    })
    .await;
}

/// A live (non-zombie) process with this pid exists.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let rest = &stat[stat.rfind(')').unwrap() + 1..];
            !matches!(rest.split_whitespace().next(), Some("Z" | "X"))
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn lifecycle_env_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path()).await;
    let mut spec = sh(
        "ticker",
        "echo started; echo \"V=$MYVAR\"; echo oops >&2; while true; do echo tick; sleep 0.1; done",
    );
    spec.env
        .insert("MYVAR".to_owned(), "hello world".to_owned());
    rt.create(&spec).await.unwrap();
    assert!(matches!(
        rt.create(&spec).await,
        Err(RuntimeError::AlreadyExists(_))
    ));

    let created = rt.get("ticker").await.unwrap();
    assert_eq!(created.status, ModuleStatus::Stopped);
    assert_eq!(created.spec, spec);
    assert!(created.started_at.is_none());

    rt.start("ticker").await.unwrap();
    // Starting a running module is a no-op.
    rt.start("ticker").await.unwrap();
    let running = rt.get("ticker").await.unwrap();
    assert_eq!(running.status, ModuleStatus::Running);
    assert!(running.started_at.is_some());
    let pid1 = running.runtime_id.clone().unwrap();

    wait_logged(&rt, "ticker", "V=hello world").await;
    // stdout and stderr are separate pipes: wait until both are through.
    eventually("stderr and two ticks", || async {
        let all = log_text(&rt, "ticker", &LogOptions::default()).await;
        all.contains("oops\n") && all.ends_with("tick\ntick\n")
    })
    .await;
    let all = log_text(&rt, "ticker", &LogOptions::default()).await;
    assert!(all.starts_with("started\n"), "{all}");
    assert!(all.contains("oops\n"), "stderr captured: {all}");

    // tail
    let tail = log_text(
        &rt,
        "ticker",
        &LogOptions {
            tail: Some(2),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(tail, "tick\ntick\n");

    // timestamps
    let stamped = log_text(
        &rt,
        "ticker",
        &LogOptions {
            tail: Some(1),
            timestamps: true,
            ..Default::default()
        },
    )
    .await;
    let (ts, text) = stamped.trim_end().split_once(' ').unwrap();
    Timestamp::parse(ts).unwrap();
    assert_eq!(text, "tick");

    // since / until
    let cut = Timestamp::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let since = log_text(
        &rt,
        "ticker",
        &LogOptions {
            since: Some(cut),
            ..Default::default()
        },
    )
    .await;
    assert!(since.contains("tick"));
    assert!(!since.contains("started"), "{since}");
    let until = log_text(
        &rt,
        "ticker",
        &LogOptions {
            until: Some(cut),
            ..Default::default()
        },
    )
    .await;
    assert!(until.contains("started"));
    assert!(until.lines().count() < all.lines().count() + 5);

    // follow: gets lines written after the call, ends when the module stops.
    let mut follow = rt
        .logs(
            "ticker",
            &LogOptions {
                follow: true,
                tail: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), follow.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"tick\n");

    // sh without a trap dies of SIGTERM: 128 + 15.
    let t0 = Instant::now();
    rt.stop("ticker", Duration::from_secs(5)).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(4));
    let stopped = rt.get("ticker").await.unwrap();
    assert_eq!(stopped.status, ModuleStatus::Failed);
    assert_eq!(stopped.exit_code, Some(143));
    assert!(stopped.exited_at.is_some());
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(item) = follow.next().await {
            item.unwrap();
        }
    })
    .await;
    assert!(end.is_ok(), "follow stream did not end after stop");
    // Stopping a stopped module is fine.
    rt.stop("ticker", Duration::from_secs(1)).await.unwrap();

    rt.restart("ticker").await.unwrap();
    let restarted = rt.get("ticker").await.unwrap();
    assert_eq!(restarted.status, ModuleStatus::Running);
    assert_ne!(restarted.runtime_id.unwrap(), pid1);
    rt.restart("ticker").await.unwrap();
    assert_eq!(
        rt.get("ticker").await.unwrap().status,
        ModuleStatus::Running
    );

    rt.remove("ticker").await.unwrap();
    assert!(matches!(
        rt.get("ticker").await,
        Err(RuntimeError::NotFound(_))
    ));
    assert!(!dir.path().join("modules/ticker").exists());
    assert!(rt.list().await.unwrap().is_empty());
    assert!(matches!(
        rt.start("ticker").await,
        Err(RuntimeError::NotFound(_))
    ));
}

#[tokio::test]
async fn sigterm_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path()).await;
    rt.create(&sh(
        "graceful",
        "trap 'echo bye; exit 0' TERM; echo ready; while true; do sleep 0.1; done",
    ))
    .await
    .unwrap();
    rt.start("graceful").await.unwrap();
    wait_logged(&rt, "graceful", "ready").await;
    let t0 = Instant::now();
    rt.stop("graceful", Duration::from_secs(10)).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    let state = rt.get("graceful").await.unwrap();
    assert_eq!(state.status, ModuleStatus::Stopped);
    assert_eq!(state.exit_code, Some(0));
    wait_logged(&rt, "graceful", "bye").await;
}

#[tokio::test]
async fn sigkill_after_timeout_kills_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path()).await;
    let pidfile = dir.path().join("grandchild.pid");
    let mut spec = sh(
        "stubborn",
        "trap '' TERM; sleep 1000 & echo $! > \"$PIDFILE\"; echo ready; while true; do sleep 0.1; done",
    );
    spec.env
        .insert("PIDFILE".to_owned(), pidfile.display().to_string());
    rt.create(&spec).await.unwrap();
    rt.start("stubborn").await.unwrap();
    wait_logged(&rt, "stubborn", "ready").await;
    let grandchild: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(grandchild));
    let leader: u32 = rt
        .get("stubborn")
        .await
        .unwrap()
        .runtime_id
        .unwrap()
        .parse()
        .unwrap();

    let t0 = Instant::now();
    rt.stop("stubborn", Duration::from_millis(800))
        .await
        .unwrap();
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(800), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let state = rt.get("stubborn").await.unwrap();
    assert_eq!(state.status, ModuleStatus::Failed);
    assert_eq!(state.exit_code, Some(137));
    eventually("the grandchild to die", || async { !alive(grandchild) }).await;
    assert!(!alive(leader));
}

#[tokio::test]
async fn leftover_group_members_die_with_the_main_process() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path()).await;
    let pidfile = dir.path().join("bg.pid");
    let mut spec = sh(
        "leaver",
        "sleep 1000 & echo $! > \"$PIDFILE\"; echo ready; sleep 0.3; exit 0",
    );
    spec.env
        .insert("PIDFILE".to_owned(), pidfile.display().to_string());
    rt.create(&spec).await.unwrap();
    rt.start("leaver").await.unwrap();
    wait_logged(&rt, "leaver", "ready").await;
    let bg: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_exit(&rt, "leaver").await;
    assert_eq!(
        rt.get("leaver").await.unwrap().status,
        ModuleStatus::Stopped
    );
    eventually("the background process to die", || async { !alive(bg) }).await;
}

#[tokio::test]
async fn exit_codes_map_to_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path()).await;
    rt.create(&sh("ok", "exit 0")).await.unwrap();
    rt.create(&sh("bad", "echo failing; exit 3")).await.unwrap();
    rt.start("ok").await.unwrap();
    rt.start("bad").await.unwrap();
    wait_exit(&rt, "ok").await;
    wait_exit(&rt, "bad").await;
    let ok = rt.get("ok").await.unwrap();
    assert_eq!(ok.status, ModuleStatus::Stopped);
    assert_eq!(ok.exit_code, Some(0));
    assert!(ok.exited_at.unwrap() >= ok.started_at.unwrap());
    let bad = rt.get("bad").await.unwrap();
    assert_eq!(bad.status, ModuleStatus::Failed);
    assert_eq!(bad.exit_code, Some(3));
    wait_logged(&rt, "bad", "failing").await;
    // Following a module that is not running returns what there is and ends.
    let text = tokio::time::timeout(
        Duration::from_secs(5),
        log_text(
            &rt,
            "bad",
            &LogOptions {
                follow: true,
                ..Default::default()
            },
        ),
    )
    .await
    .unwrap();
    assert_eq!(text, "failing\n");
}

#[tokio::test]
async fn state_survives_a_new_runtime_object() {
    let dir = tempfile::tempdir().unwrap();
    {
        let rt = runtime(dir.path()).await;
        rt.create(&sh("done", "echo bye; exit 5")).await.unwrap();
        rt.create(&sh("never", "exit 0")).await.unwrap();
        rt.create(&sh("orphan", "echo up; while true; do sleep 0.1; done"))
            .await
            .unwrap();
        rt.start("done").await.unwrap();
        rt.start("orphan").await.unwrap();
        wait_exit(&rt, "done").await;
        wait_logged(&rt, "orphan", "up").await;
    }
    // A new runtime on the same state dir, as after a daemon restart.
    let rt = runtime(dir.path()).await;
    let list = rt.list().await.unwrap();
    let names: Vec<&str> = list.iter().map(|m| m.spec.name.as_str()).collect();
    assert_eq!(names, ["done", "never", "orphan"]);
    assert_eq!(list[0].status, ModuleStatus::Failed);
    assert_eq!(list[0].exit_code, Some(5));
    assert_eq!(list[0].spec, sh("done", "echo bye; exit 5"));
    assert_eq!(list[1].status, ModuleStatus::Stopped);
    // The module left running is killed and reported failed.
    assert_eq!(list[2].status, ModuleStatus::Failed);
    assert_eq!(list[2].exit_code, None);
    let orphan_pid: u32 = list[2].runtime_id.clone().unwrap().parse().unwrap();
    eventually("the orphan to die", || async { !alive(orphan_pid) }).await;
    // Logs survive too, and the module can be started again.
    assert_eq!(log_text(&rt, "done", &LogOptions::default()).await, "bye\n");
    rt.start("orphan").await.unwrap();
    assert_eq!(
        rt.get("orphan").await.unwrap().status,
        ModuleStatus::Running
    );
    rt.remove("orphan").await.unwrap();
}

#[tokio::test]
async fn pull_working_dir_and_bad_specs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path()).await;
    rt.pull("/bin/sh -c", None).await.unwrap();
    rt.pull("sh", None).await.unwrap();
    assert!(matches!(
        rt.pull("/nonexistent/verge-module", None).await,
        Err(RuntimeError::ImageNotFound(_))
    ));

    let work = tempfile::tempdir().unwrap();
    let mut spec = sh("pwd", "pwd; echo \"$0\" \"$1\"");
    spec.create_options = serde_json::json!({
        "Cmd": ["pwd; echo \"args:$0:$1\"", "zero", "one"],
        "WorkingDir": work.path(),
        "HostConfig": {"Privileged": true}
    });
    rt.create(&spec).await.unwrap();
    rt.start("pwd").await.unwrap();
    wait_exit(&rt, "pwd").await;
    let canonical = std::fs::canonicalize(work.path()).unwrap();
    assert_eq!(
        log_text(&rt, "pwd", &LogOptions::default()).await,
        format!("{}\nargs:zero:one\n", canonical.display())
    );

    let mut missing = sh("missing", "");
    missing.image = "/nonexistent/verge-module --flag".to_owned();
    missing.create_options = serde_json::json!({});
    rt.create(&missing).await.unwrap();
    assert!(matches!(
        rt.start("missing").await,
        Err(RuntimeError::InvalidSpec { .. })
    ));

    let mut bad = sh("bad-cmd", "");
    bad.create_options = serde_json::json!({"Cmd": [1, 2]});
    assert!(matches!(
        rt.create(&bad).await,
        Err(RuntimeError::InvalidSpec { .. })
    ));
    let mut bad_name = sh("../escape", "true");
    bad_name.name = "../escape".to_owned();
    assert!(matches!(
        rt.create(&bad_name).await,
        Err(RuntimeError::InvalidSpec { .. })
    ));

    let info = rt.info().await.unwrap();
    assert_eq!(info.kind, "process");
    assert_eq!(info.os_type, "linux");
}

#[tokio::test]
async fn workload_socket_is_reachable_at_the_uri_path() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path()).await;
    let socket: PathBuf = dir.path().join("mnt/sock.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let seen = dir.path().join("run/iotedge/workload.sock");
    let mut spec = sh(
        "sock",
        "p=${IOTEDGE_WORKLOADURI#unix://}; test -S \"$p\" && echo socket-ok",
    );
    spec.env.insert(
        "IOTEDGE_WORKLOADURI".to_owned(),
        format!("unix://{}", seen.display()),
    );
    spec.workload_socket = Some(socket.clone());
    rt.create(&spec).await.unwrap();
    rt.start("sock").await.unwrap();
    wait_exit(&rt, "sock").await;
    assert_eq!(
        log_text(&rt, "sock", &LogOptions::default()).await,
        "socket-ok\n"
    );
    assert_eq!(std::fs::read_link(&seen).unwrap(), socket);
}
