//! The service API run in process over real TLS, for the integration tests
//! that call it: a fresh data directory, a loopback port that is also the
//! hub's hostname, a generated CA and the `iothubowner` policy. One copy of
//! that set-up and tear-down instead of one in each test file. Each test
//! binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use verge_cloud::api::{self, ApiState, ServiceAuth};
use verge_cloud::{CloudOptions, CloudState, tls};
use verge_core::{SasToken, SharedAccessKey};

/// A running service API; [`ApiServer::stop`] ends it.
pub struct ApiServer {
    /// `127.0.0.1:{port}`: the hub's hostname, and where it listens.
    pub host: String,
    pub addr: SocketAddr,
    pub cloud: CloudState,
    /// The `iothubowner` policy's key.
    pub policy: SharedAccessKey,
    /// The generated CA (PEM) that clients trust.
    pub ca: Vec<u8>,
    stop: oneshot::Sender<()>,
    server: JoinHandle<()>,
    // Last: removed once the store is closed.
    _dir: tempfile::TempDir,
}

impl ApiServer {
    /// [`api::serve`]: the default caps and deadlines.
    pub async fn start() -> Self {
        Self::launch(|listener, tls, state, stop| {
            tokio::spawn(api::serve(listener, tls, state, async {
                let _ = stop.await;
            }))
        })
        .await
    }

    /// [`api::serve_with`]: these caps and deadlines.
    pub async fn start_with(
        limits: verge_listen::Limits,
        timeouts: verge_listen::http::Timeouts,
    ) -> Self {
        Self::launch(move |listener, tls, state, stop| {
            let stopped = async {
                let _ = stop.await;
            };
            tokio::spawn(api::serve_with(
                listener, tls, state, stopped, limits, timeouts,
            ))
        })
        .await
    }

    async fn launch(
        spawn: impl FnOnce(
            TcpListener,
            Arc<rustls::ServerConfig>,
            ApiState,
            oneshot::Receiver<()>,
        ) -> JoinHandle<()>,
    ) -> Self {
        // reqwest and the tests' rustls clients have no crypto provider of
        // their own: ring, as verge-cloud.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let host = addr.to_string();
        let files = tls::ensure_files(dir.path(), &host, None, None).unwrap();
        let cfg = tls::server_config(&files).unwrap();
        let ca = std::fs::read(files.ca.unwrap()).unwrap();
        let cloud = CloudState::open(CloudOptions {
            data_dir: dir.path().to_owned(),
            hostname: host.clone(),
        })
        .unwrap();
        let policy = SharedAccessKey::from_bytes(vec![3u8; 32]);
        let state = ApiState {
            cloud: cloud.clone(),
            auth: Arc::new(ServiceAuth::new(
                host.clone(),
                "iothubowner",
                policy.clone(),
            )),
        };
        let (stop, stop_rx) = oneshot::channel();
        let server = spawn(listener, cfg, state, stop_rx);
        ApiServer {
            host,
            addr,
            cloud,
            policy,
            ca,
            stop,
            server,
            _dir: dir,
        }
    }

    /// A client builder that trusts the generated CA.
    pub fn https(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&self.ca).unwrap()])
    }

    /// [`ApiServer::https`] as it is.
    pub fn client(&self) -> reqwest::Client {
        self.https().build().unwrap()
    }

    /// A service token for the `iothubowner` policy (expires in 2096).
    pub fn policy_token(&self) -> String {
        SasToken::sign(&self.host, &self.policy, 4_000_000_000, Some("iothubowner")).to_string()
    }

    /// Stops the server and waits for it, then closes the store (as
    /// verge-cloud does on shutdown) before the data directory goes.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap();
        self.cloud.close();
    }
}
