//! The deployment the quickstart makes: the edge device in the cloud,
//! verged's and the hub's config files, and the manifest.

use anyhow::{Context as _, anyhow};
use serde_json::{Value, json};
use verge_core::SharedAccessKey;

use super::{
    AGENT, AGENT_METRICS_PORT, CloudInfo, FILTER, FILTER_IMAGE, FILTER_MODULE, HUB_AMQP_PORT,
    HUB_IMAGE, HUB_METRICS_PORT, HUB_MQTT_PORT, MICROSOFT_HUB_IMAGE, Quickstart, SENSOR,
    SENSOR_IMAGE, SENSOR_MODULE, write_file,
};
use crate::cloud::CloudClient;
use crate::images;

/// How verged gets the edge device's identity.
pub(super) enum Identity {
    /// Registered in the cloud directly: its connection string's key.
    Registered(SharedAccessKey),
    /// Enrolled in the cloud's DPS: verged registers with this key.
    Enrolled {
        /// The DPS's ID scope.
        id_scope: String,
        /// The enrollment's key.
        key: SharedAccessKey,
    },
}

impl Quickstart {
    /// Creates an individual DPS enrollment for the edge device (symmetric
    /// key, an IoT Edge device) and returns what verged registers with.
    pub(super) async fn enroll_device(&self, client: &CloudClient) -> anyhow::Result<Identity> {
        let id = &self.args.device_id;
        let scope_file = self.lay.cloud_data.join("dps").join("id_scope");
        let id_scope = std::fs::read_to_string(&scope_file)
            .with_context(|| format!("reading the DPS's ID scope ({})", scope_file.display()))?
            .trim()
            .to_owned();
        let body = json!({
            "registrationId": id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {}},
            "capabilities": {"iotEdge": true},
        });
        let e = client
            .call(
                reqwest::Method::PUT,
                &format!("/enrollments/{}", verge_core::sas::url_encode(id)),
                Some(&body),
            )
            .await
            .context("enrolling the edge device in the DPS")?;
        let key = e
            .pointer("/attestation/symmetricKey/primaryKey")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("the DPS gave the enrollment no key"))?;
        let key = SharedAccessKey::from_base64(key)
            .map_err(|e| anyhow!("the enrollment key: {}", e.reason))?;
        Ok(Identity::Enrolled { id_scope, key })
    }

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
        identity: &Identity,
        cloud: &CloudInfo,
    ) -> anyhow::Result<()> {
        let l = &self.lay;
        // The agent follows its $edgeAgent twin in the cloud (on the cloud's
        // MQTT port, trusting its CA) and reports the deployment's status there.
        let agent_env = format!(
            "VERGE_AGENT_UPSTREAM_PORT = \"{}\"\nVERGE_AGENT_UPSTREAM_CA = '{}'\n\
             VERGE_AGENT_REPORT_INTERVAL_MS = \"1000\"\n\
             VERGE_AGENT_METRICS_LISTEN = \"127.0.0.1:{AGENT_METRICS_PORT}\"\n",
            cloud.mqtt_port,
            cloud.ca.display()
        );
        let provisioning = match identity {
            Identity::Registered(key) => format!(
                "source = \"manual\"\n\
                 connection_string = \"HostName=localhost;DeviceId={};SharedAccessKey={}\"",
                self.args.device_id,
                key.to_base64()
            ),
            // DPS on the cloud's HTTPS port (as aziot dials it), assigning
            // the device to the cloud itself.
            Identity::Enrolled { id_scope, key } => format!(
                "source = \"dps\"\n\
                 global_endpoint = \"https://localhost:{}/\"\n\
                 id_scope = \"{id_scope}\"\n\
                 [provisioning.attestation]\n\
                 method = \"symmetric_key\"\n\
                 registration_id = \"{}\"\n\
                 symmetric_key = {{ value = \"{}\" }}",
                cloud.https_port,
                self.args.device_id,
                key.to_base64()
            ),
        };
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
             https_port = {https_port}\n\
             {provisioning}\n\n\
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
                format!(
                    "\n# Modules are containers; the agent stays a process.\n\
                     [moby_runtime]\n\
                     uri = \"unix:///var/run/docker.sock\"\n\
                     network = \"azure-iot-edge\"\n\n\
                     # The manifest names Microsoft's edgeHub image: this one runs instead.\n\
                     [system_modules]\n\
                     edge_hub = \"{}\"\n",
                    images::reference(HUB_IMAGE)
                )
            } else {
                String::new()
            },
            home = l.homedir.display(),
            cloud_ca = cloud.ca.display(),
            https_port = cloud.https_port,
            agent_env = agent_env,
            workload = l.workload_dir().display(),
            mgmt = l.mgmt_socket().display(),
        );
        match verge_daemon::config::Config::parse(&text, &l.config) {
            Ok(_) => {}
            // Enrolled: verged registers when it starts.
            Err(e)
                if matches!(identity, Identity::Enrolled { .. })
                    && e.message == verge_daemon::config::NOT_PROVISIONED => {}
            Err(e) => return Err(anyhow!("the generated verged config is invalid: {e}")),
        }
        write_file(&l.config, text.as_bytes(), 0o600)
    }

    /// The edgeHub module's environment: the hub has no config file of its
    /// own (as Azure's edgeHub): verged gives it its identities and
    /// certificate, its `$edgeHub` twin in the cloud its routes, and these
    /// variables the rest (`verge_hub::azure_env`): `storageFolder` as in
    /// Azure manifests, the listeners and the cloud's ports (verge-cloud
    /// listens on free ports) as Verge's own.
    fn hub_env(&self, cloud: &CloudInfo) -> Value {
        let storage = self.lay.hub_dir.join("storage");
        json!({
            "storageFolder": {"value": storage.display().to_string()},
            "VERGE_HUB_LISTEN_MQTT": {"value": format!("127.0.0.1:{HUB_MQTT_PORT}")},
            "VERGE_HUB_LISTEN_HTTPS": {"value": "127.0.0.1:0"},
            "VERGE_HUB_LISTEN_AMQPS": {"value": format!("127.0.0.1:{HUB_AMQP_PORT}")},
            "Metrics__Listener__Host": {"value": "127.0.0.1"},
            "Metrics__Listener__Port": {"value": HUB_METRICS_PORT.to_string()},
            "VERGE_HUB_UPSTREAM_PORT": {"value": cloud.mqtt_port.to_string()},
            "VERGE_HUB_UPSTREAM_AMQP_PORT": {"value": cloud.amqp_port.to_string()},
            "VERGE_HUB_UPSTREAM_HTTPS_PORT": {"value": cloud.https_port.to_string()},
        })
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
    pub(super) fn manifest(&self, cloud: &CloudInfo) -> Value {
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
        let (hub_options, sensor_image, filter_image, module_options) = if self.args.docker {
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
                "HostConfig": {"NetworkMode": "host", "Binds": [format!("{dir}:{dir}")]},
            });
            (
                hub,
                images::reference(SENSOR_IMAGE),
                images::reference(FILTER_IMAGE),
                modules,
            )
        } else {
            (
                json!({}),
                self.exe(SENSOR).display().to_string(),
                self.exe(FILTER).display().to_string(),
                json!({}),
            )
        };
        // Microsoft's edgeHub image, as in Azure's manifests: verged runs
        // Verge's hub in its place (`verge_daemon::system_images`; with
        // --docker, the image built here, named in verged's config).
        let hub_image = MICROSOFT_HUB_IMAGE.to_owned();
        json!({"modulesContent": {
            "$edgeAgent": {"properties.desired": {
                "schemaVersion": "1.1",
                "runtime": {"type": "docker", "settings": {"minDockerVersion": "v1.25"}},
                "systemModules": {
                    "edgeAgent": {"type": "docker", "settings": {"image": self.daemon(AGENT).display().to_string(), "createOptions": "{}"}},
                    "edgeHub": module(hub_image, hub_options, 0, self.hub_env(cloud)),
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
