//! The blob upload endpoint in-process over real TLS (generated CA): a SAS
//! URL issued with the service policy takes Azure-style `Put Blob` requests
//! for its container only, until it expires, and what was written reads
//! back with its content type and encoding.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use serde_json::Value;
use verge_cloud::api::{ApiState, ServiceAuth};
use verge_cloud::{CloudOptions, CloudState, tls};
use verge_core::{SasToken, SharedAccessKey};

#[tokio::test]
async fn sas_url_uploads_block_blobs_to_its_container_only() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let files = tls::ensure_files(dir.path(), &host, None, None).unwrap();
    let cfg = tls::server_config(&files).unwrap();
    let cloud = CloudState::open(CloudOptions {
        data_dir: dir.path().to_owned(),
        hostname: host.clone(),
    })
    .unwrap();
    let key = SharedAccessKey::from_bytes(vec![3u8; 32]);
    let state = ApiState {
        cloud,
        auth: Arc::new(ServiceAuth::new(host.clone(), "iothubowner", key.clone())),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(verge_cloud::api::serve(listener, cfg, state, async {
        let _ = stop_rx.await;
    }));
    let ca = std::fs::read(files.ca.unwrap()).unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .unwrap();
    let token = SasToken::sign(&host, &key, 4_000_000_000, Some("iothubowner")).to_string();
    let base = format!("https://{host}");

    // Issuing needs the policy.
    let r = http
        .post(format!("{base}/verge/sas/logs"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let sas: Value = http
        .post(format!("{base}/verge/sas/logs?expirySecs=600"))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = sas["sasUrl"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with(&format!("{base}/verge/blobs/logs?")),
        "{url}"
    );
    let (path, query) = url.split_once('?').unwrap();
    let put = |blob: &str, q: &str| {
        http.put(format!("{path}/{blob}?{q}"))
            .header("x-ms-blob-type", "BlockBlob")
            .header("content-type", "text/plain")
            .header("content-encoding", "gzip")
            .body("hello blob")
    };

    let r = put("hub/dev/edgeHub-2026.log", query).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.headers().contains_key("etag"));
    // Another container, a changed expiry, no signature: refused.
    let other = format!("{base}/verge/blobs/other/x?{query}");
    let r = http
        .put(other)
        .header("x-ms-blob-type", "BlockBlob")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-ms-error-code"], "AuthenticationFailed");
    let se = sas["expiresOn"].as_str().unwrap();
    let later = query.replace(
        &verge_core::sas::url_encode(se),
        &verge_core::sas::url_encode("2099-01-01T00:00:00.000Z"),
    );
    assert_ne!(later, query);
    assert_eq!(put("a", &later).send().await.unwrap().status(), 403);
    assert_eq!(put("a", "sp=cw").send().await.unwrap().status(), 403);
    // Only block blobs; no escaping the container.
    let r = http
        .put(format!("{path}/a?{query}"))
        .header("x-ms-blob-type", "AppendBlob")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = put("a%2F..%2F..%2Fx", query).send().await.unwrap();
    assert_eq!(r.status(), 400);

    // Read back with the policy: the list and the blob.
    let list: Value = http
        .get(format!("{base}/verge/blobs/logs"))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        list["blobs"],
        serde_json::json!([{"name": "hub/dev/edgeHub-2026.log", "size": 10,
            "contentType": "text/plain", "contentEncoding": "gzip"}])
    );
    let r = http
        .get(format!("{base}/verge/blobs/logs/hub/dev/edgeHub-2026.log"))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"hello blob");
    let r = http
        .get(format!("{base}/verge/blobs/logs/hub/dev/edgeHub-2026.log"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let _ = stop_tx.send(());
    server.await.unwrap();
}
