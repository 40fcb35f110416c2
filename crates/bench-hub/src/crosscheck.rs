//! A cross-check of the generator's numbers with tools nobody here wrote
//! (`mosquitto_pub`/`mosquitto_sub`, mqttwrk).

use super::*;

/// `mosquitto_sub -C n` then `mosquitto_pub --repeat n`; end-to-end msgs/s.
pub(crate) fn cli_check(args: &Args, addr: SocketAddr, hub: Option<&Pki>) -> anyhow::Result<f64> {
    let n = args.cli_messages.to_string();
    let port = addr.port().to_string();
    let payload = "x".repeat(args.payload);
    let mut sub = Command::new(&args.mosquitto_sub);
    sub.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-q",
        "1",
        "-C",
        &n,
        "-N",
        "--quiet",
    ]);
    let mut publ = Command::new(&args.mosquitto_pub);
    publ.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-q",
        "1",
        "--repeat",
        &n,
        "-M",
        "32",
    ]);
    publ.args([
        "-m",
        &payload,
        "-t",
        &format!("devices/{DEVICE}/modules/pub0/messages/events/%24.on=out1"),
    ]);
    publ.args(["-i", &format!("{DEVICE}/pub0")]);
    sub.args(["-i", &format!("{DEVICE}/{SINK}")]);
    if let Some(pki) = hub {
        let ca = pki.ca.display().to_string();
        sub.args([
            "--cafile",
            &ca,
            "-u",
            &username(&format!("{DEVICE}/{SINK}")),
            "-P",
            &module_token(SINK),
        ]);
        sub.args(["-t", &format!("devices/{DEVICE}/modules/{SINK}/inputs/#")]);
        publ.args([
            "--cafile",
            &ca,
            "-u",
            &username(&format!("{DEVICE}/pub0")),
            "-P",
            &module_token("pub0"),
        ]);
    } else {
        sub.args([
            "-t",
            &format!("devices/{DEVICE}/modules/+/messages/events/#"),
        ]);
    }
    let mut sub = sub.stdout(Stdio::null()).stdin(Stdio::null()).spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let st = publ.stdout(Stdio::null()).stdin(Stdio::null()).status()?;
    if !st.success() {
        let _ = sub.kill();
        let _ = sub.wait();
        bail!("mosquitto_pub failed: {st}");
    }
    let limit = Duration::from_secs_f64(args.drain_secs + 30.0);
    loop {
        if let Some(st) = sub.try_wait()? {
            if !st.success() {
                bail!("mosquitto_sub failed: {st}");
            }
            return Ok(args.cli_messages as f64 / t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > limit {
            let _ = sub.kill();
            let _ = sub.wait();
            bail!("mosquitto_sub did not receive {n} messages within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `mqttwrk bench` (it has no username, password, client id or topic options,
/// so it can only drive a plain broker): (publisher, subscriber) msgs/s.
pub(crate) fn mqttwrk_check(args: &Args, addr: SocketAddr) -> anyhow::Result<(f64, f64)> {
    let n = (args.cli_messages * 5).to_string();
    let out = Command::new("timeout")
        .arg(format!("{}", (args.drain_secs + 60.0) as u64))
        .arg(&args.mqttwrk)
        .args([
            "bench",
            "-S",
            "127.0.0.1",
            "-P",
            &addr.port().to_string(),
            "-n",
            &n,
        ])
        .args(["-p", "1", "-s", "1", "-m", &args.payload.to_string()])
        .args([
            "--publish-qos",
            "1",
            "--subscribe-qos",
            "1",
            "-i",
            &args.window.to_string(),
        ])
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rates: Vec<f64> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("throughput:"))
        .filter_map(|l| {
            l.split(':')
                .nth(1)?
                .trim()
                .trim_end_matches(',')
                .parse()
                .ok()
        })
        .collect();
    match rates.as_slice() {
        [p, s, ..] => Ok((*p, *s)),
        _ => bail!("mqttwrk: no throughput in its output ({})", out.status),
    }
}
