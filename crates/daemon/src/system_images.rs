//! Microsoft's system-module images stand for Verge's own agent and hub.
//!
//! An Azure deployment manifest names `mcr.microsoft.com/azureiotedge-hub:1.x`
//! for edgeHub, and aziot's `config.toml` names
//! `mcr.microsoft.com/azureiotedge-agent:1.x` for edgeAgent. Those are
//! Microsoft's .NET programs; on Verge the same manifest must run Verge's
//! hub and agent unchanged. So verged, the one place that knows its backend
//! and its own executable, replaces such an image (any registry, any tag:
//! fleets mirror them into their own registries) before the runtime sees it:
//!
//! * `[system_modules] edge_hub` / `edge_agent` in verged's config, when set
//!   (the only way for the Docker backend: a Verge hub image built or
//!   pulled by the operator);
//! * else, on the process backend, verged's own executable: the multi-call
//!   `verge-edge` (`verge-edge hub`), or the `verge-hub` / `verge-agent`
//!   executable beside `verged`.
//!
//! The manifest's image is what the agent reports; the log says what ran.

use std::path::{Path, PathBuf};

/// Which of Microsoft's system modules an image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemModule {
    /// `azureiotedge-agent`.
    Agent,
    /// `azureiotedge-hub`.
    Hub,
}

impl SystemModule {
    /// Microsoft's repository name.
    pub fn repository(self) -> &'static str {
        match self {
            Self::Agent => "azureiotedge-agent",
            Self::Hub => "azureiotedge-hub",
        }
    }

    fn subcommand(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Hub => "hub",
        }
    }

    fn executable(self) -> &'static str {
        match self {
            Self::Agent => "verge-agent",
            Self::Hub => "verge-hub",
        }
    }

    fn config_key(self) -> &'static str {
        match self {
            Self::Agent => "system_modules.edge_agent",
            Self::Hub => "system_modules.edge_hub",
        }
    }
}

/// The system module `image` names, if it is one of Microsoft's: the last
/// path segment of the repository is `azureiotedge-hub` or
/// `azureiotedge-agent`, with or without a tag or digest.
pub fn microsoft_system_module(image: &str) -> Option<SystemModule> {
    let image = image.trim();
    // Executables with arguments are never images of Microsoft's.
    if image.contains(char::is_whitespace) {
        return None;
    }
    let repo = image.split('@').next().unwrap_or(image);
    let last = repo.rsplit('/').next().unwrap_or(repo);
    let name = last.split(':').next().unwrap_or(last);
    [SystemModule::Agent, SystemModule::Hub]
        .into_iter()
        .find(|m| m.repository() == name)
}

/// `[system_modules]` of verged's config, and what verged knows of itself.
#[derive(Debug, Clone, Default)]
pub struct SystemImages {
    /// `edge_hub`: what runs for Microsoft's hub image.
    pub edge_hub: Option<String>,
    /// `edge_agent`: what runs for Microsoft's agent image.
    pub edge_agent: Option<String>,
    /// verged's own executable (the process backend's default).
    pub own_exe: Option<PathBuf>,
}

impl SystemImages {
    /// With verged's running executable as the process backend's default.
    pub fn with_current_exe(mut self) -> Self {
        self.own_exe = std::env::current_exe().ok();
        self
    }

    /// What to run for `image`: `Ok(None)` when it is not Microsoft's (run
    /// as given), `Ok(Some(replacement))` when it is, `Err` when it is and
    /// nothing stands for it (Docker backend without `[system_modules]`).
    pub fn resolve(&self, image: &str, docker: bool) -> Result<Option<String>, String> {
        let Some(module) = microsoft_system_module(image) else {
            return Ok(None);
        };
        let configured = match module {
            SystemModule::Agent => &self.edge_agent,
            SystemModule::Hub => &self.edge_hub,
        };
        if let Some(c) = configured
            .as_deref()
            .map(str::trim)
            .filter(|c| !c.is_empty())
        {
            return Ok(Some(c.to_owned()));
        }
        if docker {
            return Err(format!(
                "`{image}` is Microsoft's {repo} image; Verge runs its own {what} in its place: \
                 set `{key}` in verged's config to a Verge image (for example the one \
                 `verge quickstart --docker` builds, verge-quickstart/edgehub:local)",
                repo = module.repository(),
                what = module.subcommand(),
                key = module.config_key(),
            ));
        }
        let own = self.own_exe.as_deref().ok_or_else(|| {
            format!(
                "`{image}` stands for Verge's {}, but verged cannot tell its own executable; \
                 set `{}` in verged's config",
                module.subcommand(),
                module.config_key()
            )
        })?;
        own_command(own, module).map(Some).ok_or_else(|| {
            format!(
                "`{image}` stands for Verge's {}: neither {} nor verge-edge is beside {}; \
                 set `{}` in verged's config",
                module.subcommand(),
                module.executable(),
                own.display(),
                module.config_key()
            )
        })
    }
}

/// The command line of Verge's `module` next to verged's executable `own`:
/// the multi-call verge-edge (verged, the agent and the hub in one file;
/// `/proc/self/exe` names it even when started through a `verged` link)
/// runs it as a subcommand; a `verged` executable has it beside itself.
fn own_command(own: &Path, module: SystemModule) -> Option<String> {
    if own.file_name().is_some_and(|n| n != "verged") {
        return Some(format!("{} {}", own.display(), module.subcommand()));
    }
    let sibling = own.with_file_name(module.executable());
    if sibling.is_file() {
        return Some(sibling.display().to_string());
    }
    let edge = own.with_file_name("verge-edge");
    edge.is_file()
        .then(|| format!("{} {}", edge.display(), module.subcommand()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_microsofts_images_in_any_registry() {
        for (image, want) in [
            (
                "mcr.microsoft.com/azureiotedge-hub:1.5",
                Some(SystemModule::Hub),
            ),
            (
                "mcr.microsoft.com/azureiotedge-agent:1.4",
                Some(SystemModule::Agent),
            ),
            (
                "myacr.azurecr.io/mirror/azureiotedge-hub:1.5.3",
                Some(SystemModule::Hub),
            ),
            ("azureiotedge-hub", Some(SystemModule::Hub)),
            (
                "mcr.microsoft.com/azureiotedge-hub@sha256:abcd",
                Some(SystemModule::Hub),
            ),
            (
                "localhost:5000/azureiotedge-agent:1.5",
                Some(SystemModule::Agent),
            ),
            (
                "mcr.microsoft.com/azureiotedge-simulated-temperature-sensor:1.5",
                None,
            ),
            ("/usr/bin/azureiotedge-hub --flag", None),
            ("localhost:5000/other:1", None),
        ] {
            assert_eq!(microsoft_system_module(image), want, "{image}");
        }
    }

    #[test]
    fn configured_image_wins_and_docker_needs_one() {
        let s = SystemImages {
            edge_hub: Some("verge/edgehub:1".into()),
            edge_agent: None,
            own_exe: Some(PathBuf::from("/opt/verge/verge-edge")),
        };
        let hub = "mcr.microsoft.com/azureiotedge-hub:1.5";
        let agent = "mcr.microsoft.com/azureiotedge-agent:1.5";
        assert_eq!(
            s.resolve(hub, true).unwrap().as_deref(),
            Some("verge/edgehub:1")
        );
        assert_eq!(
            s.resolve(hub, false).unwrap().as_deref(),
            Some("verge/edgehub:1")
        );
        let e = s.resolve(agent, true).unwrap_err();
        assert!(e.contains("system_modules.edge_agent"), "{e}");
        assert_eq!(
            s.resolve(agent, false).unwrap().as_deref(),
            Some("/opt/verge/verge-edge agent")
        );
        assert_eq!(s.resolve("my/module:1", true).unwrap(), None);
    }

    #[test]
    fn verged_with_siblings_runs_them() {
        let dir = tempfile::tempdir().unwrap();
        let verged = dir.path().join("verged");
        std::fs::write(&verged, "").unwrap();
        let s = SystemImages {
            own_exe: Some(verged.clone()),
            ..SystemImages::default()
        };
        let hub = "mcr.microsoft.com/azureiotedge-hub:1.5";
        // Nothing beside it: an error naming the key.
        let e = s.resolve(hub, false).unwrap_err();
        assert!(e.contains("system_modules.edge_hub"), "{e}");
        std::fs::write(dir.path().join("verge-edge"), "").unwrap();
        assert_eq!(
            s.resolve(hub, false).unwrap().unwrap(),
            format!("{} hub", dir.path().join("verge-edge").display())
        );
        std::fs::write(dir.path().join("verge-hub"), "").unwrap();
        assert_eq!(
            s.resolve(hub, false).unwrap().unwrap(),
            dir.path().join("verge-hub").display().to_string()
        );
    }
}
