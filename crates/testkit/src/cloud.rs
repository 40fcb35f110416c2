//! verge-cloud's config file and start, for tests that run the real binary (no verge-cloud dep).
//!
//! The binary prints `listening on <scheme>://<addr>` on stdout for each
//! listener it serves, `https://` last; its log (stderr) is appended to
//! `cloud.log` in the test's directory, so a restarted cloud keeps one log.

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A verge-cloud config built from the parts a test cares about, so its layout is written once.
#[derive(Clone, Debug)]
pub struct Config {
    data_dir: PathBuf,
    listen: String,
    mqtt_listen: String,
    amqps_listen: Option<String>,
    hostname: Option<String>,
    policy_key: Option<String>,
    extra: String,
}

impl Config {
    /// Starts a config whose data lives in `data_dir`, listening on 127.0.0.1 port 0 (HTTPS, MQTT).
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            listen: "127.0.0.1:0".to_owned(),
            mqtt_listen: "127.0.0.1:0".to_owned(),
            amqps_listen: None,
            hostname: None,
            policy_key: None,
            extra: String::new(),
        }
    }

    /// `listen` (the service API's HTTPS address), for a cloud on a fixed port.
    pub fn listen(mut self, addr: &str) -> Self {
        addr.clone_into(&mut self.listen);
        self
    }

    /// `mqtt_listen`, for a cloud on a fixed port (the Azure device SDK dials 8883 only).
    pub fn mqtt_listen(mut self, addr: &str) -> Self {
        addr.clone_into(&mut self.mqtt_listen);
        self
    }

    /// `amqps_listen`, for tests of the AMQPS device endpoint (off unless set).
    pub fn amqps_listen(mut self, addr: &str) -> Self {
        self.amqps_listen = Some(addr.to_owned());
        self
    }

    /// `hostname`, when the SAS audience and certificate must name a host other than `listen`'s.
    pub fn hostname(mut self, hostname: &str) -> Self {
        self.hostname = Some(hostname.to_owned());
        self
    }

    /// `[service] policy_key` (base64), so the test knows the key instead of reading the generated one.
    pub fn policy_key(mut self, key: &str) -> Self {
        self.policy_key = Some(key.to_owned());
        self
    }

    /// Appends TOML after the `[service]` section, for a test's own sections (`[dps]`, …).
    pub fn extra(mut self, toml: &str) -> Self {
        crate::push_toml(&mut self.extra, toml);
        self
    }

    /// The config's text, for [`CloudProc::start`] or a test that edits it.
    pub fn render(&self) -> String {
        let mut s = format!(
            "data_dir = {:?}\nlisten = \"{}\"\nmqtt_listen = \"{}\"\n",
            self.data_dir.display().to_string(),
            self.listen,
            self.mqtt_listen
        );
        if let Some(a) = &self.amqps_listen {
            let _ = writeln!(s, "amqps_listen = \"{a}\"");
        }
        if let Some(h) = &self.hostname {
            let _ = writeln!(s, "hostname = \"{h}\"");
        }
        if let Some(k) = &self.policy_key {
            let _ = write!(s, "[service]\npolicy_key = \"{k}\"\n");
        }
        s.push_str(&self.extra);
        s
    }
}

/// How long [`CloudProc::start`] waits for the addresses.
const START_LIMIT: Duration = Duration::from_secs(30);

/// verge-cloud started for real, with the addresses it printed. Killed when dropped.
pub struct CloudProc {
    child: Option<Child>,
    log_path: PathBuf,
    stdout: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    https: String,
    mqtts: String,
    amqps: Option<String>,
}

impl Drop for CloudProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl CloudProc {
    /// Writes `config_toml` to `dir/cloud.toml`, starts `bin` on it and waits (30 s) for its addresses.
    //
    // RUST_LOG is `rust_log`, stderr is appended to `dir/cloud.log`, stdout
    // is read to the end (its lines kept) so the cloud never writes into a
    // closed pipe. A cloud that exits or stays silent fails the test with
    // its log.
    pub fn start(bin: &Path, config_toml: &str, dir: &Path, rust_log: &str) -> Self {
        let cfg = dir.join("cloud.toml");
        std::fs::write(&cfg, config_toml).unwrap();
        let log_path = dir.join("cloud.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", rust_log)
            .env("VERGE_LOG_FORMAT", "text")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let reader = {
            let stdout = Arc::clone(&stdout);
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    // Kept before it is sent: whatever start() saw is in the log.
                    stdout.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            })
        };
        let mut proc = Self {
            child: Some(child),
            log_path,
            stdout,
            reader: Some(reader),
            https: String::new(),
            mqtts: String::new(),
            amqps: None,
        };
        let deadline = Instant::now() + START_LIMIT;
        while proc.https.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                panic!(
                    "verge-cloud did not report its addresses within {START_LIMIT:?}; log:\n{}",
                    proc.log()
                );
            };
            let Some(url) = line.strip_prefix("listening on ") else {
                continue;
            };
            let url = url.trim();
            if let Some(a) = url.strip_prefix("https://") {
                a.clone_into(&mut proc.https);
            } else if let Some(a) = url.strip_prefix("mqtts://") {
                a.clone_into(&mut proc.mqtts);
            } else if let Some(a) = url.strip_prefix("amqps://") {
                proc.amqps = Some(a.to_owned());
            }
        }
        proc
    }

    /// The service API's address (`host:port`), for connection strings and URLs.
    pub fn https(&self) -> &str {
        &self.https
    }

    /// The service API's port.
    pub fn https_port(&self) -> u16 {
        port_of(&self.https)
    }

    /// The MQTT device endpoint's address (`host:port`).
    pub fn mqtts(&self) -> &str {
        &self.mqtts
    }

    /// The MQTT device endpoint's port, for device clients.
    pub fn mqtts_port(&self) -> u16 {
        port_of(&self.mqtts)
    }

    /// The AMQPS device endpoint's port; panics without `amqps_listen`.
    pub fn amqps_port(&self) -> u16 {
        port_of(
            self.amqps
                .as_deref()
                .expect("verge-cloud reported no amqps address"),
        )
    }

    /// What the cloud printed (stdout lines, then `cloud.log`), for assertions and failure messages.
    pub fn log(&self) -> String {
        let mut s = self.stdout.lock().unwrap().join("\n");
        s.push('\n');
        s.push_str(&std::fs::read_to_string(&self.log_path).unwrap_or_default());
        s
    }

    /// Whether [`log`](Self::log) contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log().contains(text)
    }

    /// Sends `signal` (`TERM`, `INT`) and waits up to `limit` for the exit; its code (`None`: killed by a signal).
    pub fn stop(&mut self, signal: &str, limit: Duration) -> Option<i32> {
        let child = self.child.as_mut().unwrap();
        assert!(crate::send_signal(child, signal), "kill -{signal} failed");
        let Some(status) = crate::wait_exit(child, limit) else {
            panic!(
                "verge-cloud did not exit within {limit:?} of SIG{signal}; log:\n{}",
                self.log()
            );
        };
        self.drain();
        status.code()
    }

    /// SIGTERM, asserting a clean exit (code 0) within `limit`: verge-cloud's shutdown works.
    pub fn stop_term(&mut self, limit: Duration) {
        let code = self.stop("TERM", limit);
        assert_eq!(code, Some(0), "verge-cloud's exit after SIGTERM");
    }

    /// The process itself, for a harness that stops it its own way (no kill on drop any more).
    pub fn into_child(mut self) -> Child {
        self.child.take().unwrap()
    }

    /// Waits (at most 1 s) for the last stdout lines after the exit.
    fn drain(&mut self) {
        let Some(reader) = self.reader.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        while !reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if reader.is_finished() {
            let _ = reader.join();
        }
    }
}

/// The port of `host:port`.
fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}
