//! Out of descriptors (EMFILE), the accept loop backs off instead of
//! spinning, and serves the waiting connections once descriptors are back.
//! Its own test binary: it lowers the whole process's `RLIMIT_NOFILE`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use verge_listen::{CancellationToken, Conn, Limits, Listener};

/// The highest descriptor number open now.
fn max_fd() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn accept_backs_off_on_emfile_and_recovers() {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    // Connected before the limit drops: they wait in the backlog.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(TcpStream::connect(addr).await.unwrap());
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // No new descriptor can be created: every accept fails with EMFILE.
    setrlimit(Resource::RLIMIT_NOFILE, max_fd() + 1, hard).unwrap();
    // …and the free numbers below it are taken too.
    let mut fillers = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        fillers.push(f);
    }

    let cancel = CancellationToken::new();
    let listener = Listener::new(
        "emfile",
        tcp,
        Limits::new(16, Duration::from_secs(5)),
        cancel.clone(),
    );
    let stats = listener.stats();
    let run = tokio::spawn(listener.run(|mut io: TcpStream, _conn: Conn| async move {
        let mut b = [0u8; 1];
        if io.read_exact(&mut b).await.is_ok() {
            let _ = io.write_all(&b).await;
        }
    }));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let errors = stats.accept_errors();
    // 10, 20, 40 … ms pauses: a handful of attempts, not thousands.
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    drop(fillers);
    assert!(
        (1..=10).contains(&errors),
        "{errors} accept errors in 700 ms"
    );

    // Descriptors are back: the waiting connections are served.
    for c in &mut clients {
        c.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(3), c.read_exact(&mut b))
            .await
            .expect("connection not served after the limit was raised")
            .unwrap();
    }
    cancel.cancel();
    run.await.unwrap();
}
