//! The deployment the quickstart makes: the edge device in the cloud,
//! verged's and the hub's config files, and the manifest.

use anyhow::{Context as _, anyhow};
use serde_json::{Value, json};
use verge_core::SharedAccessKey;

use super::{
    AGENT, CloudInfo, FILTER, FILTER_IMAGE, FILTER_MODULE, HUB, HUB_IMAGE, HUB_MQTT_PORT,
    Quickstart, SENSOR, SENSOR_IMAGE, SENSOR_MODULE, write_file,
};
use crate::cloud::CloudClient;
use crate::images;

impl Quickstart {
    pub(super) async fn register_device(
        &self,
        client: &CloudClient,
    ) -> anyhow::Result<SharedAccessKey> {
        let id = &self.args.device_id;
        let body = json!({
            "deviceId": id,
            "status": "enabled",
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": null, "secondaryKey": null}},
            "capabilities": {"iotEdge": true},
        });
        let d = client
            .call(
                reqwest::Method::PUT,
                &format!("/devices/{}", verge_core::sas::url_encode(id)),
                Some(&body),
            )
            .await
            .context("registering the edge device")?;
        let key = d
            .pointer("/authentication/symmetricKey/primaryKey")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("the cloud gave the device no key"))?;
        SharedAccessKey::from_base64(key).map_err(|e| anyhow!("the device key: {}", e.reason))
    }

    pub(super) fn write_verged_config(
        &self,
        device_key: &SharedAccessKey,
        cloud: &CloudInfo,
    ) -> anyhow::Result<()> {
        let l = &self.lay;
        // The agent follows its $edgeAgent twin in the cloud (on the cloud's
        // MQTT port, trusting its CA) and reports the deployment's status there.
        let agent_env = format!(
            "VERGE_AGENT_UPSTREAM_PORT = \"{}\"\nVERGE_AGENT_UPSTREAM_CA = '{}'\n\
             VERGE_AGENT_REPORT_INTERVAL_MS = \"1000\"\n",
            cloud.mqtt_port,
            cloud.ca.display()
        );
        let cs = format!(
            "HostName=localhost;DeviceId={};SharedAccessKey={}",
            self.args.device_id,
            device_key.to_base64()
        );
        let agent = format!(
            "{} --storage {} --interval-ms 1000",
            self.daemon(AGENT).display(),
            l.agent_storage.display()
        );
        // Paths are checked free of quotes, so TOML literal strings hold them as is.
        let text = format!(
            "# Written by `verge quickstart`.\n\
             hostname = \"localhost\"\n\
             homedir = '{home}'\n\n\
             # verged registers its module identities in the cloud over HTTPS:\n\
             # the cloud's CA joins the trust bundle.\n\
             trust_bundle_cert = '{cloud_ca}'\n\n\
             [provisioning]\n\
             source = \"manual\"\n\
             connection_string = \"{cs}\"\n\
             https_port = {https_port}\n\n\
             [agent]\n\
             name = \"edgeAgent\"\n\
             type = \"process\"\n\n\
             [agent.config]\n\
             image = '{agent}'\n\n\
             [agent.env]\n\
             RuntimeLogLevel = \"info\"\n\
             {agent_env}\n\
             [listen]\n\
             workload_uri = \"unix://{workload}\"\n\
             management_uri = \"unix://{mgmt}\"\n\
             {moby}",
            moby = if self.args.docker {
                "\n# Modules are containers; the agent stays a process.\n\
                 [moby_runtime]\n\
                 uri = \"unix:///var/run/docker.sock\"\n\
                 network = \"azure-iot-edge\"\n"
            } else {
                ""
            },
            home = l.homedir.display(),
            cloud_ca = cloud.ca.display(),
            https_port = cloud.https_port,
            agent_env = agent_env,
            workload = l.workload_dir().display(),
            mgmt = l.mgmt_socket().display(),
        );
        verge_daemon::config::Config::parse(&text, &l.config)
            .map_err(|e| anyhow!("the generated verged config is invalid: {e}"))?;
        write_file(&l.config, text.as_bytes(), 0o600)
    }

    /// Creates the module identities in verged up front (the agent's module
    /// creation then reuses them), so their generation ids, and with them
    /// the module keys verged derives, are known now (verged registers them
    /// in the cloud); writes the hub's config file.
    /// Writes the hub's config: listeners and the upstream only. verged runs
    /// the hub as edgeHub, so its server certificate and module identities
    /// come from verged's workload API, its leaf devices from the cloud's
    /// device scope, and its routes from its `$edgeHub` twin in the cloud
    /// (set by the deployment) — nothing else is written here.
    pub(super) fn write_hub_config(&self, cloud: &CloudInfo) -> anyhow::Result<()> {
        let h = &self.lay.hub_dir;
        let text = format!(
            "# Written by `verge quickstart`.\n\
             storage_dir = '{storage}'\n\n\
             [listen]\n\
             mqtt = \"127.0.0.1:{HUB_MQTT_PORT}\"\n\
             https = \"127.0.0.1:0\"\n\n\
             [upstream]\n\
             hostname = \"localhost\"\n\
             port = {mqtt_port}\n\
             https_port = {https_port}\n\
             ca_file = '{ca}'\n\
             reconnect_ms = 1000\n",
            storage = h.join("storage").display(),
            mqtt_port = cloud.mqtt_port,
            https_port = cloud.https_port,
            ca = cloud.ca.display(),
        );
        write_file(&h.join("hub.toml"), text.as_bytes(), 0o600)
    }

    /// The `$edgeHub` desired properties: sensor → filter → $upstream (and,
    /// with `--measure`, the sensor's readings upstream as well, so the first
    /// message is not held back by the filter's threshold).
    pub(super) fn routes(&self) -> Value {
        let mut routes = serde_json::Map::new();
        routes.insert(
            "sensorToFilter".into(),
            json!(format!(
                "FROM /messages/modules/{SENSOR_MODULE}/outputs/temperatureOutput \
                 INTO BrokeredEndpoint(\"/modules/{FILTER_MODULE}/inputs/input1\")"
            )),
        );
        routes.insert(
            "filterToCloud".into(),
            json!(format!(
                "FROM /messages/modules/{FILTER_MODULE}/outputs/* INTO $upstream"
            )),
        );
        if self.args.measure {
            routes.insert(
                "sensorToCloud".into(),
                json!(format!(
                    "FROM /messages/modules/{SENSOR_MODULE}/outputs/* INTO $upstream"
                )),
            );
        }
        json!({
            "schemaVersion": "1.1",
            "routes": routes,
            "storeAndForwardConfiguration": {"timeToLiveSecs": 7200},
        })
    }

    /// The deployment manifest, from `examples/quickstart.deployment.json`
    /// with this machine's binary paths.
    pub(super) fn manifest(&self) -> Value {
        let module = |image: String, create_options: Value, order: u32, env: Value| {
            let mut m = json!({
                "version": "1.0",
                "type": "docker",
                "status": "running",
                "restartPolicy": "always",
                "startupOrder": order,
                "settings": {"image": image, "createOptions": create_options.to_string()},
                "env": env,
            });
            if self.args.docker {
                // Built here, in no registry.
                m["imagePullPolicy"] = json!("never");
            }
            m
        };
        let hub_config = self.lay.hub_dir.join("hub.toml");
        let (hub_image, hub_options, sensor_image, filter_image, module_options) =
            if self.args.docker {
                // Host networking: the hub listens on 127.0.0.1:8883 and reaches
                // verge-cloud on loopback, as in process mode (the modules dial
                // `localhost`). Containers run as this user, so what the hub
                // writes under the working directory (mounted at the same
                // path) stays removable.
                let user = format!(
                    "{}:{}",
                    nix::unistd::getuid().as_raw(),
                    nix::unistd::getgid().as_raw()
                );
                let dir = self.lay.dir.display().to_string();
                let modules = json!({"User": user, "HostConfig": {"NetworkMode": "host"}});
                let hub = json!({
                    "User": user,
                    "Cmd": ["--config", hub_config.display().to_string()],
                    "HostConfig": {"NetworkMode": "host", "Binds": [format!("{dir}:{dir}")]},
                });
                (
                    images::reference(HUB_IMAGE),
                    hub,
                    images::reference(SENSOR_IMAGE),
                    images::reference(FILTER_IMAGE),
                    modules,
                )
            } else {
                (
                    format!(
                        "{} --config {}",
                        self.daemon(HUB).display(),
                        hub_config.display()
                    ),
                    json!({}),
                    self.exe(SENSOR).display().to_string(),
                    self.exe(FILTER).display().to_string(),
                    json!({}),
                )
            };
        json!({"modulesContent": {
            "$edgeAgent": {"properties.desired": {
                "schemaVersion": "1.1",
                "runtime": {"type": "docker", "settings": {"minDockerVersion": "v1.25"}},
                "systemModules": {
                    "edgeAgent": {"type": "docker", "settings": {"image": self.daemon(AGENT).display().to_string(), "createOptions": "{}"}},
                    "edgeHub": module(hub_image, hub_options, 0, json!({})),
                },
                "modules": {
                    SENSOR_MODULE: module(sensor_image, module_options.clone(), 1,
                        json!({"SendInterval": {"value": "1"}})),
                    FILTER_MODULE: module(filter_image, module_options, 1, json!({})),
                },
            }},
            "$edgeHub": {"properties.desired": self.routes()},
            FILTER_MODULE: {"properties.desired": {"TemperatureThreshold": 25}},
        }})
    }
}
