//! The service API closes connections that hold a slot without making
//! progress: silent after TLS, a request head sent a line at a time
//! (slowloris), a body that stops arriving.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::ApiServer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

async fn closed_within(s: &mut (impl AsyncRead + Unpin), limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn silent_slowloris_and_stalled_body_connections_are_closed() {
    let second = Duration::from_secs(1);
    let api = ApiServer::start_with(
        verge_listen::Limits {
            max_connections: 20,
            max_per_peer: 20,
            handshake_timeout: Duration::from_secs(5),
        },
        verge_listen::http::Timeouts {
            header: second,
            body: second,
            write: second * 2,
            grace: second,
        },
    )
    .await;
    let addr = api.addr;
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&api.ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ));
    let open = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        connector.connect(name, tcp).await.unwrap()
    };
    let token = api.policy_token();

    let mut silent = open().await;
    let (mut slow_r, mut slow_w) = tokio::io::split(open().await);
    let drip = tokio::spawn(async move {
        let _ = slow_w
            .write_all(b"GET /devices?api-version=2021-04-12 HTTP/1.1\r\nHost: x\r\n")
            .await;
        for i in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow_w
                .write_all(format!("X-Drip-{i}: x\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // Authorized, so the handler reads the body, which stops after a byte.
    let mut stalled = open().await;
    stalled
        .write_all(
            format!(
                "PUT /devices/d1?api-version=2021-04-12 HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .await
        .unwrap();

    let limit = Duration::from_secs(4);
    let (a, b, c) = tokio::join!(
        closed_within(&mut silent, limit),
        closed_within(&mut slow_r, limit),
        closed_within(&mut stalled, limit),
    );
    drip.abort();
    assert!(a, "silent connection still open");
    assert!(b, "slowloris connection still open");
    assert!(c, "stalled-body connection still open");

    // A whole request is still answered.
    let mut ok = open().await;
    ok.write_all(
        format!("GET /devices?api-version=2021-04-12 HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), ok.read_to_end(&mut resp)).await;
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&resp)
    );

    api.stop().await;
}
