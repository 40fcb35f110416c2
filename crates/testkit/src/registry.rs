//! A private registry for pull tests: Debian's `docker-registry`
//! (installed by scripts/test-images.sh) on a free 127.0.0.1 port with
//! htpasswd (bcrypt) auth. Docker allows plain HTTP to 127.0.0.0/8
//! registries, so no daemon configuration is needed.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The registry's user.
pub const USER: &str = "verge";
/// The registry's password.
pub const PASSWORD: &str = "s3cret-pw";

/// A private registry on 127.0.0.1; killed, and every local image of it
/// untagged, on drop.
pub struct Registry {
    dir: tempfile::TempDir,
    child: Child,
    /// `127.0.0.1:<port>`.
    pub address: String,
}

impl Registry {
    /// Starts one (panics when it cannot).
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = crate::stdout_of(Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]));
        std::fs::write(dir.path().join("htpasswd"), htpasswd).unwrap();
        // A free port; another process may still take it before the
        // registry binds it: then the registry exits and we try the next one.
        for _ in 0..5 {
            let port = crate::net::free_port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                     http:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: verge-test\n    path: {}\n",
                    dir.path().join("data").display(),
                    dir.path().join("htpasswd").display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self {
                        dir,
                        child,
                        address: format!("127.0.0.1:{port}"),
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "docker-registry did not start: {}",
            std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
        );
    }

    /// The Docker CLI with a private client config.
    pub fn docker(&self) -> Command {
        // A private client config, so the login touches nothing of the machine's.
        let mut c = Command::new("docker");
        c.arg("--config").arg(self.dir.path().join("docker"));
        c
    }

    /// Pushes the local image `local` as `<registry>/<repo>`, removes the
    /// local tags of this registry, and returns (tagged reference, manifest
    /// digest).
    pub fn push(&self, local: &str, repo: &str) -> (String, String) {
        let reference = format!("{}/{repo}", self.address);
        crate::stdout_of(Command::new("docker").args(["tag", local, &reference]));
        let mut login = self
            .docker()
            .args(["login", "-u", USER, "--password-stdin", &self.address])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        login
            .stdin
            .take()
            .unwrap()
            .write_all(PASSWORD.as_bytes())
            .unwrap();
        assert!(login.wait().unwrap().success(), "docker login failed");
        let out = crate::stdout_of(self.docker().args(["push", &reference]));
        let digest = out
            .split_whitespace()
            .find(|w| w.starts_with("sha256:") && w.len() == 71)
            .unwrap_or_else(|| panic!("no digest in push output: {out}"))
            .to_owned();
        self.untag_all();
        (reference, digest)
    }

    /// Removes every local reference to this registry (the image itself stays
    /// as `verge-test/busybox:1`).
    pub fn untag_all(&self) {
        let refs = crate::stdout_of(Command::new("docker").args([
            "images",
            "--digests",
            "--format",
            "{{.Repository}} {{.Tag}} {{.Digest}}",
        ]));
        for line in refs.lines() {
            let mut parts = line.split(' ');
            let (Some(repo), Some(tag), Some(digest)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if !repo.starts_with(&format!("{}/", self.address)) {
                continue;
            }
            if tag != "<none>" {
                let _ = Command::new("docker")
                    .args(["rmi", &format!("{repo}:{tag}")])
                    .output();
            }
            if digest != "<none>" {
                let _ = Command::new("docker")
                    .args(["rmi", &format!("{repo}@{digest}")])
                    .output();
            }
        }
    }

    /// A manifest's `registryCredentials` for this registry under the
    /// name `private`, with `password`.
    pub fn credentials(&self, password: &str) -> Value {
        json!({ "private": { "address": self.address, "username": USER, "password": password } })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.untag_all();
    }
}
