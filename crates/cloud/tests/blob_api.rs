//! The blob upload endpoint in-process over real TLS (generated CA): a SAS
//! URL issued with the service policy takes Azure-style `Put Blob` requests
//! for its container only, until it expires, and what was written reads
//! back with its content type and encoding.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::ApiServer;
use serde_json::Value;

#[tokio::test]
async fn sas_url_uploads_block_blobs_to_its_container_only() {
    let api = ApiServer::start().await;
    let http = api
        .https()
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .unwrap();
    let token = api.policy_token();
    let base = format!("https://{}", api.host);

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

    api.stop().await;
}
