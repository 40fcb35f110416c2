//! `modules-reach-edgehub`: can every container module reach the edge hub?
//!
//! With Docker, modules reach edgeHub by the device's hostname, which is
//! edgeHub's network alias on the module network (`azure-iot-edge`): a
//! module on another network, or without one, shows running yet never
//! connects. An Azure manifest sets no `NetworkMode`, so every module lands
//! on the module network; a `NetworkMode` in a module's or edgeHub's
//! `createOptions` is what can break it, and this check says which module
//! and what to change.

use serde_json::Value;
use verge_daemon::api::ModuleDetails;

use super::Outcome;

/// Where a container's network traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Net {
    /// `NetworkMode: host`.
    Host,
    /// A Docker network by name (the module network when none is set).
    Named(String),
    /// `NetworkMode: none`.
    Disconnected,
    /// `NetworkMode: container:<id>`: another container's network.
    Shared(String),
}

/// The network of a container created from `create_options` by verged,
/// which puts it on `module_network` unless `HostConfig.NetworkMode` says
/// otherwise (`default` and `bridge` are Docker's default bridge).
pub(super) fn network_of(create_options: &Value, module_network: &str) -> Net {
    let mode = create_options
        .get("HostConfig")
        .and_then(|h| h.get("NetworkMode"))
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|m| !m.is_empty());
    match mode {
        None => Net::Named(module_network.to_owned()),
        Some("host") => Net::Host,
        Some("none") => Net::Disconnected,
        Some("default") => Net::Named("bridge".to_owned()),
        Some(m) => match m.strip_prefix("container:") {
            Some(other) => Net::Shared(other.to_owned()),
            None => Net::Named(m.to_owned()),
        },
    }
}

/// Whether `create_options` publish the hub's MQTT port on the host.
fn publishes_mqtt(create_options: &Value) -> bool {
    create_options
        .get("HostConfig")
        .and_then(|h| h.get("PortBindings"))
        .and_then(Value::as_object)
        .is_some_and(|b| b.contains_key("8883/tcp"))
}

/// The verdict on `modules` (docker ones; edgeHub among them), worst first.
pub(super) fn verdict(
    modules: &[ModuleDetails],
    module_network: &str,
    hostname: &str,
) -> (Outcome, Vec<String>) {
    let containers: Vec<&ModuleDetails> = modules.iter().filter(|m| m.kind == "docker").collect();
    let Some(hub) = containers.iter().find(|m| m.name == "edgeHub") else {
        return (
            Outcome::Skipped,
            vec!["edgeHub is not deployed as a container".to_owned()],
        );
    };
    let hub_options = &hub.config.settings.create_options;
    let hub_net = network_of(hub_options, module_network);
    let mut worst = Outcome::Ok;
    let mut details = Vec::new();
    let mut fine = 0usize;
    let mut note = |o: Outcome, text: String, worst: &mut Outcome| {
        *worst = (*worst).max(o);
        details.push(text);
    };
    if hub_net == Net::Disconnected {
        note(
            Outcome::Error,
            "edgeHub has NetworkMode none: no module can reach it; remove NetworkMode from its createOptions".to_owned(),
            &mut worst,
        );
    }
    for m in containers.iter().filter(|m| m.name != "edgeHub") {
        let name = &m.name;
        match (
            &hub_net,
            network_of(&m.config.settings.create_options, module_network),
        ) {
            (_, Net::Disconnected) => note(
                Outcome::Error,
                format!("{name} has NetworkMode none: it cannot reach edgeHub"),
                &mut worst,
            ),
            (_, Net::Shared(other)) => note(
                Outcome::Warning,
                format!("{name} uses the network of container {other}: not checked"),
                &mut worst,
            ),
            (Net::Named(h), Net::Named(n)) if *h == n => fine += 1,
            (Net::Named(h), Net::Named(n)) => note(
                Outcome::Error,
                format!(
                    "{name} is on network {n}, edgeHub on {h}: {name} cannot reach edgeHub at \
                     {hostname}; remove NetworkMode from {name}'s createOptions (modules join \
                     {module_network} by default)"
                ),
                &mut worst,
            ),
            (Net::Named(h), Net::Host) if publishes_mqtt(hub_options) => note(
                Outcome::Warning,
                format!(
                    "{name} uses the host's network, edgeHub is on {h} with 8883 published: \
                     {name} reaches it only if {hostname} resolves to this machine"
                ),
                &mut worst,
            ),
            (Net::Named(h), Net::Host) => note(
                Outcome::Error,
                format!(
                    "{name} uses the host's network, edgeHub is on {h} and publishes no port \
                     8883: {name} cannot reach it; remove NetworkMode from {name}'s createOptions"
                ),
                &mut worst,
            ),
            (Net::Host, Net::Host) => fine += 1,
            (Net::Host, Net::Named(n)) => note(
                Outcome::Warning,
                format!(
                    "{name} is on network {n} but edgeHub uses the host's network: {name} \
                     reaches it only if {hostname} resolves, inside the container, to an \
                     address of this machine the hub listens on; remove NetworkMode from \
                     edgeHub's createOptions to put both on {module_network}"
                ),
                &mut worst,
            ),
            (Net::Disconnected | Net::Shared(_), _) => {}
        }
    }
    if worst == Outcome::Ok {
        let where_ = match &hub_net {
            Net::Host => "the host's network".to_owned(),
            Net::Named(n) => format!("network {n}"),
            Net::Disconnected | Net::Shared(_) => "its network".to_owned(),
        };
        details.push(format!(
            "edgeHub and {fine} module(s) share {where_}; modules dial {hostname}"
        ));
    }
    (worst, details)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn module(name: &str, opts: Value) -> ModuleDetails {
        let mut m = ModuleDetails::bare(name, "docker", "x", "running");
        m.config.settings.create_options = opts;
        m
    }

    const NET: &str = "azure-iot-edge";

    #[test]
    fn azure_manifests_share_the_module_network() {
        let hub = module(
            "edgeHub",
            json!({"HostConfig": {"PortBindings": {"8883/tcp": [{"HostPort": "8883"}]}}}),
        );
        let (o, d) = verdict(&[hub, module("sensor", json!({}))], NET, "edge1");
        assert_eq!(o, Outcome::Ok, "{d:?}");
        assert!(d[0].contains("network azure-iot-edge"), "{d:?}");
    }

    #[test]
    fn a_module_elsewhere_is_named_with_the_fix() {
        let mods = [
            module("edgeHub", json!({})),
            module("lost", json!({"HostConfig": {"NetworkMode": "bridge"}})),
            module("off", json!({"HostConfig": {"NetworkMode": "none"}})),
            module("hosted", json!({"HostConfig": {"NetworkMode": "host"}})),
        ];
        let (o, d) = verdict(&mods, NET, "edge1");
        assert_eq!(o, Outcome::Error);
        assert!(
            d.iter()
                .any(|l| l.starts_with("lost is on network bridge, edgeHub on azure-iot-edge")),
            "{d:?}"
        );
        assert!(
            d.iter().any(|l| l.starts_with("off has NetworkMode none")),
            "{d:?}"
        );
        assert!(
            d.iter()
                .any(|l| l.contains("hosted uses the host's network")
                    && l.contains("publishes no port 8883")),
            "{d:?}"
        );
    }

    #[test]
    fn hub_on_the_host_network_warns_for_bridged_modules() {
        let mods = [
            module("edgeHub", json!({"HostConfig": {"NetworkMode": "host"}})),
            module("a", json!({})),
            module("b", json!({"HostConfig": {"NetworkMode": "host"}})),
        ];
        let (o, d) = verdict(&mods, NET, "edge1");
        assert_eq!(o, Outcome::Warning);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].starts_with("a is on network azure-iot-edge but edgeHub uses the host's network")
        );
        let (o, _) = verdict(&[module("a", json!({}))], NET, "edge1");
        assert_eq!(o, Outcome::Skipped);
    }
}
