//! The brokers under test as child processes: verge-hub (its PKI and
//! config) and Mosquitto; CPU time and RSS from /proc.

use super::*;

pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) child: Child,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
    pub(crate) fn stop(mut self) {
        // SIGINT first (the hub shuts down cleanly on ctrl-c), then SIGKILL.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("  {} did not stop on SIGINT; killing", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

pub(crate) async fn wait_listening(addr: SocketAddr, p: &mut Proc) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = TcpStream::connect(addr).await {
            drop(s);
            return Ok(());
        }
        if let Ok(Some(st)) = p.child.try_wait() {
            bail!("{} exited early: {st}", p.name);
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("{} not listening on {addr} after 20 s", p.name);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU time (user + system) of a process so far.
pub(crate) fn cpu_time(pid: u32) -> Duration {
    static TCK: OnceLock<f64> = OnceLock::new();
    let tck = *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    });
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    Duration::from_secs_f64(f.iter().sum::<f64>() / tck)
}

/// (VmRSS, VmHWM) in KiB.
pub(crate) fn rss_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// "RssAnon x MiB + RssFile y MiB" of a process.
pub(crate) fn rss_split(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    format!(
        "RssAnon {:.1} MiB + RssFile {:.1} MiB + RssShmem {:.1} MiB",
        field("RssAnon:"),
        field("RssFile:"),
        field("RssShmem:")
    )
}

pub(crate) struct Pki {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) ca: PathBuf,
    pub(crate) connector: tokio_rustls::TlsConnector,
}

pub(crate) fn make_pki(dir: &Path) -> anyhow::Result<Pki> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "verge hub-bench CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate()?;
    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;
    let (cert, key, ca) = (
        dir.join("server.pem"),
        dir.join("server.key"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert, format!("{}{}", leaf.pem(), ca_cert.pem()))?;
    std::fs::write(&key, leaf_key.serialize_pem())?;
    std::fs::write(&ca, ca_cert.pem())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone())?;
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Pki {
        cert,
        key,
        ca,
        connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
    })
}

pub(crate) const MAX_PUBS: usize = 16;

pub(crate) fn write_hub_config(
    dir: &Path,
    pki: &Pki,
    (mqtt, https): (u16, u16),
    amqps: Option<u16>,
    inflight: usize,
    tag: &str,
) -> anyhow::Result<PathBuf> {
    let mut routes = String::from("{\n  \"schemaVersion\": \"1.1\",\n  \"routes\": {\n");
    for i in 0..MAX_PUBS {
        let _ = writeln!(
            routes,
            "    \"pub{i}ToSink\": \"FROM /messages/modules/pub{i}/outputs/out1 INTO BrokeredEndpoint(\\\"/modules/{SINK}/inputs/in1\\\")\","
        );
    }
    routes.push_str(
        "    \"sinkAlerts\": \"FROM /messages/modules/sink/outputs/alerts WHERE alert = 'high' INTO $upstream\",\n    \"leafUp\": \"FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) INTO $upstream\"\n  },\n  \"storeAndForwardConfiguration\": {\"timeToLiveSecs\": 7200}\n}\n",
    );
    let routes_file = dir.join("routes.json");
    std::fs::write(&routes_file, routes)?;
    let mut modules = String::new();
    for m in (0..MAX_PUBS)
        .map(|i| format!("pub{i}"))
        .chain([SINK.to_owned()])
    {
        let _ = writeln!(modules, "{m} = \"{}\"", generation(&m));
    }
    let storage = dir.join(format!("hub-store-{tag}"));
    let _ = std::fs::remove_dir_all(&storage);
    let text = format!(
        r#"iothub_hostname = "{IOTHUB}"
hostname = "localhost"
device_id = "{DEVICE}"
device_key = "{DEVICE_KEY}"
storage_dir = "{storage}"
routes_file = "{routes}"
[listen]
mqtt = "127.0.0.1:{mqtt}"
https = "127.0.0.1:{https}"
{amqps}[tls]
cert = "{cert}"
key = "{key}"
[modules]
{modules}[devices]
leaf1 = "{LEAF_KEY}"
[limits]
max_inflight = {inflight}
"#,
        storage = storage.display(),
        routes = routes_file.display(),
        amqps = amqps.map_or_else(String::new, |p| format!("amqps = \"127.0.0.1:{p}\"\n")),
        cert = pki.cert.display(),
        key = pki.key.display(),
    );
    let path = dir.join(format!("hub-{tag}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

pub(crate) fn start_hub(
    args: &Args,
    dir: &Path,
    pki: &Pki,
    tag: &str,
    amqp: bool,
) -> anyhow::Result<(Proc, SocketAddr, Option<SocketAddr>)> {
    let (mqtt, https) = (free_port()?, free_port()?);
    let amqps = if amqp { Some(free_port()?) } else { None };
    let cfg = write_hub_config(dir, pki, (mqtt, https), amqps, args.inflight, tag)?;
    let log = std::fs::File::create(dir.join(format!("hub-{tag}.log")))?;
    let child = Command::new(&args.hub_bin)
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", args.hub_bin.display()))?;
    Ok((
        Proc {
            name: "verge-hub".into(),
            child,
        },
        SocketAddr::from(([127, 0, 0, 1], mqtt)),
        amqps.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
    ))
}

pub(crate) struct Mosq {
    pub(crate) proc: Proc,
    pub(crate) tcp: SocketAddr,
    pub(crate) tls: SocketAddr,
}

pub(crate) fn start_mosquitto(
    args: &Args,
    dir: &Path,
    pki: &Pki,
    persistence: bool,
    tag: &str,
) -> anyhow::Result<Mosq> {
    let (tcp, tls) = (free_port()?, free_port()?);
    let pdir = dir.join(format!("mosq-{tag}"));
    let _ = std::fs::remove_dir_all(&pdir);
    std::fs::create_dir_all(&pdir)?;
    let conf = format!(
        "per_listener_settings false\nallow_anonymous true\nlog_dest none\n\
         max_inflight_messages {inflight}\nmax_queued_messages 1000000\n\
         persistence {persistence}\npersistence_location {pdir}/\n\
         listener {tcp} 127.0.0.1\n\
         listener {tls} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n",
        pdir = pdir.display(),
        inflight = args.inflight,
        cert = pki.cert.display(),
        key = pki.key.display(),
    );
    let path = dir.join(format!("mosquitto-{tag}.conf"));
    std::fs::write(&path, conf)?;
    let log = std::fs::File::create(dir.join(format!("mosquitto-{tag}.log")))?;
    let child = Command::new(&args.mosquitto_bin)
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", args.mosquitto_bin.display()))?;
    Ok(Mosq {
        proc: Proc {
            name: "mosquitto".into(),
            child,
        },
        tcp: SocketAddr::from(([127, 0, 0, 1], tcp)),
        tls: SocketAddr::from(([127, 0, 0, 1], tls)),
    })
}
