//! verged's config file and start, for tests that run the real daemon (no verge-daemon dep).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A verged config built from the parts a test cares about, so its fixed layout is written once.
#[derive(Clone, Debug)]
pub struct Config {
    homedir: PathBuf,
    trust_bundle_cert: Option<PathBuf>,
    provisioning: String,
    agent_image: String,
    agent_env: Vec<(String, String)>,
    extra: String,
}

impl Config {
    /// Starts a config for a verged whose home is `homedir` (hostname `edge1.local`).
    pub fn new(homedir: &Path) -> Self {
        Self {
            homedir: homedir.to_path_buf(),
            trust_bundle_cert: None,
            provisioning: String::new(),
            agent_image: String::new(),
            agent_env: Vec::new(),
            extra: String::new(),
        }
    }

    /// `[provisioning]` by `connection_string` (`source = "manual"`): how most tests provision.
    pub fn manual(self, connection_string: &str) -> Self {
        self.provisioning(
            "manual",
            &format!("connection_string = \"{connection_string}\""),
        )
    }

    /// `[provisioning]` as `source` plus raw `lines`: for DPS, keys or certificates instead.
    pub fn provisioning(mut self, source: &str, lines: &str) -> Self {
        self.provisioning = format!("source = \"{source}\"\n{lines}");
        self
    }

    /// Top-level `trust_bundle_cert`, for a verged that must trust a test cloud's CA.
    pub fn trust_bundle_cert(mut self, path: &Path) -> Self {
        self.trust_bundle_cert = Some(path.to_path_buf());
        self
    }

    /// The command line verged runs as its process agent `edgeAgent` (`[agent.config] image`).
    pub fn agent_image(mut self, image: &str) -> Self {
        self.agent_image = image.to_owned();
        self
    }

    /// Adds one `[agent.env]` entry, for settings a test passes to its agent.
    pub fn agent_env(mut self, key: &str, value: &str) -> Self {
        self.agent_env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Appends TOML after the agent section, for a test's own sections (`[edge_ca]`, …).
    pub fn extra(mut self, toml: &str) -> Self {
        crate::push_toml(&mut self.extra, toml);
        self
    }

    /// The config's text, for tests that edit it or write it themselves.
    pub fn render(&self) -> String {
        let mut s = format!(
            "hostname = \"edge1.local\"\nhomedir = \"{}\"\n",
            self.homedir.display()
        );
        if let Some(ca) = &self.trust_bundle_cert {
            let _ = writeln!(s, "trust_bundle_cert = \"{}\"", ca.display());
        }
        // Line numbers matter to tests that point at a key in an error
        // (hostname 1, homedir 2, `[provisioning]` 4 without a trust bundle).
        let _ = write!(
            s,
            "\n[provisioning]\n{}\n\n[agent]\nname = \"edgeAgent\"\ntype = \"process\"\n\
             [agent.config]\nimage = \"{}\"\n",
            self.provisioning.trim_end_matches('\n'),
            self.agent_image
        );
        if !self.agent_env.is_empty() {
            s.push_str("[agent.env]\n");
            for (k, v) in &self.agent_env {
                let _ = writeln!(s, "{k} = \"{v}\"");
            }
        }
        if !self.extra.is_empty() {
            s.push('\n');
            s.push_str(&self.extra);
        }
        s
    }

    /// Writes the config to `path` and returns that path, to pass as verged's `--config`.
    pub fn write(&self, path: impl Into<PathBuf>) -> PathBuf {
        let path = path.into();
        std::fs::write(&path, self.render()).unwrap();
        path
    }
}

/// Starts verged (`bin --config cfg`) and waits for its `mgmt` socket: for tests using that API.
//
// RUST_LOG is `rust_log`; stdout is discarded and stderr is the test's, so
// `JOURNAL_STREAM` is removed (verged must not log as if to the journal).
// Waits up to 30 s; on a timeout verged is stopped and the test panics.
pub fn start(bin: &Path, cfg: &Path, rust_log: &str, mgmt: &Path) -> Child {
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(cfg)
        .env("RUST_LOG", rust_log)
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !mgmt.exists() {
        if start.elapsed() > Duration::from_secs(30) {
            stop(&mut child);
            panic!(
                "verged did not open its management socket {} within 30 s",
                mgmt.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// SIGTERM (verged stops its agent), then SIGKILL after 5 s.
fn stop(child: &mut Child) {
    crate::send_signal(child, "TERM");
    if crate::wait_exit(child, Duration::from_secs(5)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
