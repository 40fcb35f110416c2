//! Running the official Azure IoT SDKs for Python from a test: the Python
//! that has them, a fixed port the SDKs dial, a script run with a deadline.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The Python that has the official Azure IoT SDKs: `VERGE_PYTHON`, else
/// the repository's `.venv` (what `scripts/test.sh` installs). Panics, with
/// how to get one, unless `import {modules}` works there.
pub fn azure_python(modules: &str) -> PathBuf {
    let p = std::env::var_os("VERGE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")
        });
    python_that_imports(p, modules, "set VERGE_PYTHON, or run scripts/test.sh")
}

/// The Python with Apache Qpid Proton (Debian's `python3-qpid-proton`):
/// `VERGE_PROTON_PYTHON`, else `/usr/bin/python3`; panics unless it can
/// import `proton`.
pub fn proton_python() -> PathBuf {
    let p = std::env::var_os("VERGE_PROTON_PYTHON")
        .map_or_else(|| PathBuf::from("/usr/bin/python3"), PathBuf::from);
    python_that_imports(
        p,
        "proton",
        "apt-get install python3-qpid-proton (scripts/test.sh does), or set VERGE_PROTON_PYTHON",
    )
}

/// `python` if it can `import {modules}`, else a failure naming `fix`.
fn python_that_imports(python: PathBuf, modules: &str, fix: &str) -> PathBuf {
    let ok = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "no Python with {modules} at {}: {fix}",
        python.display()
    );
    python
}

/// True once 127.0.0.1:`port` can be bound, waiting up to `wait` (for
/// another test that owns a fixed port the Azure SDKs dial).
pub fn port_free_within(port: u16, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `cmd` to its end, killing it after `limit`: its exit status
/// (`None`: killed), stdout and stderr.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> (Option<ExitStatus>, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read both pipes while it runs, so a chatty child cannot block on a full one.
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    })
    .collect();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = readers.into_iter().map(|h| h.join().unwrap_or_default());
    let stdout = out.next().unwrap_or_default();
    let stderr = out.next().unwrap_or_default();
    (status, stdout, stderr)
}
