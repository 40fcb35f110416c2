//! The quickstart's own `cargo build` of the binaries it runs, when run
//! through `cargo run`.

use std::path::PathBuf;

use anyhow::{Context as _, anyhow, bail};

use super::{PACKAGES, Quickstart};

/// The `cargo build` of the quickstart's binaries, run from under `cargo run`.
struct InnerBuild<'a> {
    cargo: PathBuf,
    /// Where cargo runs (the workspace of the `verge` being run).
    workspace: PathBuf,
    target_dir: PathBuf,
    /// `debug`, `release` or a custom profile's name.
    profile: String,
    packages: Vec<&'a str>,
}

impl InnerBuild<'_> {
    /// The command, with the environment `env` (this process's) less what
    /// `cargo run` set for `verge` itself (see [`cargo_run_var`]).
    fn command(
        &self,
        env: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.cargo);
        cmd.env_clear()
            .envs(env.into_iter().filter(|(k, _)| !cargo_run_var(k)));
        cmd.arg("build");
        for p in &self.packages {
            cmd.args(["-p", p]);
        }
        cmd.arg("--target-dir")
            .arg(&self.target_dir)
            .current_dir(&self.workspace);
        match self.profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        cmd
    }
}

/// Whether `name` is a variable `cargo run` (or `cargo test`) sets for the
/// crate it runs. They must not reach the inner `cargo build`: build scripts
/// declare `rerun-if-env-changed` on some of them (ring does, on
/// `CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, `OUT_DIR`, …), and cargo compares them
/// with its own environment, so a build with them differs from the user's
/// `cargo run` without them, and each run rebuilt ring and all that depends
/// on it twice. `CARGO` (which cargo), `CARGO_HOME`, `CARGO_TARGET_DIR`,
/// `CARGO_BUILD_*`, `CARGO_PROFILE_*`, `RUSTUP_*` and the rest are the
/// user's settings and stay.
fn cargo_run_var(name: &std::ffi::OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    const EXACT: [&str; 9] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    const PREFIXES: [&str; 3] = ["CARGO_PKG_", "CARGO_BIN_EXE_", "CARGO_CFG_"];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

impl Quickstart {
    /// Under `cargo run` (cargo sets `CARGO` and `CARGO_MANIFEST_DIR`) and
    /// without `--bin-dir`: builds the sibling binaries with the same
    /// profile first, so `cargo run --profile quickstart -p verge-cli --
    /// quickstart` is the whole quickstart and never runs stale binaries.
    pub(super) fn build_siblings(&self) -> anyhow::Result<()> {
        let (Some(cargo), Some(manifest_dir)) = (
            std::env::var_os("CARGO"),
            std::env::var_os("CARGO_MANIFEST_DIR"),
        ) else {
            return Ok(());
        };
        if self.args.bin_dir.is_some() {
            return Ok(());
        }
        let profile = self
            .bin
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug")
            .to_owned();
        let target_dir = self
            .bin
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent", self.bin.display()))?;
        eprintln!("Building the runtime's binaries ({profile}) …");
        let build = InnerBuild {
            cargo: cargo.into(),
            workspace: manifest_dir.into(),
            target_dir: target_dir.to_path_buf(),
            profile,
            packages: PACKAGES.split_whitespace().filter(|p| *p != "-p").collect(),
        };
        let status = build
            .command(std::env::vars_os())
            .status()
            .context("running cargo build")?;
        if !status.success() {
            bail!("cargo build of the runtime's binaries failed ({status})");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeMap;
    use std::path::Path;

    use serde_json::Value;

    /// What `cargo run -p <package>` adds to the environment of what it runs.
    fn as_run_by(package: &str) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        let mut env: Vec<_> = std::env::vars_os().collect();
        for (k, v) in [
            ("CARGO_PKG_NAME", package.to_owned()),
            ("CARGO_PKG_VERSION", "9.9.9".to_owned()),
            ("CARGO_MANIFEST_DIR", format!("/src/{package}")),
            ("CARGO_MANIFEST_PATH", format!("/src/{package}/Cargo.toml")),
            ("CARGO_CRATE_NAME", package.replace('-', "_")),
            ("CARGO_BIN_NAME", package.to_owned()),
            ("CARGO_PRIMARY_PACKAGE", "1".to_owned()),
            ("OUT_DIR", format!("/target/{package}/out")),
        ] {
            env.retain(|(n, _)| n != k);
            env.push((k.into(), v.into()));
        }
        env
    }

    #[test]
    fn inner_build_env_drops_what_cargo_run_set() {
        let build = InnerBuild {
            cargo: "/usr/bin/cargo".into(),
            workspace: "/src".into(),
            target_dir: "/src/target".into(),
            profile: "quickstart".into(),
            packages: vec!["verge-cloud", "verge-edge"],
        };
        let mut env = as_run_by("verge-cli");
        for (k, v) in [
            ("CARGO", "/usr/bin/cargo"),
            ("CARGO_HOME", "/home/u/.cargo"),
            ("CARGO_TARGET_DIR", "/t"),
            ("CARGO_PROFILE_RELEASE_LTO", "thin"),
            ("RUSTUP_TOOLCHAIN", "stable"),
            ("PATH", "/usr/bin"),
            ("CARGO_BIN_EXE_verge", "/t/verge"),
        ] {
            env.push((k.into(), v.into()));
        }
        let cmd = build.command(env);
        let set: BTreeMap<String, Option<String>> = cmd
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        for gone in [
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION",
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "OUT_DIR",
            "CARGO_BIN_EXE_verge",
        ] {
            assert!(!set.contains_key(gone), "{gone} reaches the inner build");
        }
        for (kept, v) in [
            ("CARGO", "/usr/bin/cargo"),
            ("CARGO_HOME", "/home/u/.cargo"),
            ("CARGO_TARGET_DIR", "/t"),
            ("CARGO_PROFILE_RELEASE_LTO", "thin"),
            ("RUSTUP_TOOLCHAIN", "stable"),
            ("PATH", "/usr/bin"),
        ] {
            assert_eq!(set.get(kept), Some(&Some(v.to_owned())), "{kept}");
        }
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            args,
            [
                "build",
                "-p",
                "verge-cloud",
                "-p",
                "verge-edge",
                "--target-dir",
                "/src/target",
                "--profile",
                "quickstart"
            ]
        );
        assert_eq!(cmd.get_current_dir(), Some(Path::new("/src")));
    }

    /// The bug this guards against: a build script with
    /// `rerun-if-env-changed` on a variable `cargo run` sets (ring has them)
    /// ran again on every inner build, and all that depends on it was
    /// compiled again. A tiny package with such a build script, built as
    /// one `cargo run` would build it and then as another: the second build
    /// compiles nothing.
    #[test]
    fn second_inner_build_compiles_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("probe");
        std::fs::create_dir_all(ws.join("src")).unwrap();
        std::fs::write(
            ws.join("Cargo.toml"),
            "[package]\nname = \"probe\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[workspace]\n",
        )
        .unwrap();
        let mut script = String::from("fn main() {\n");
        for v in [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "OUT_DIR",
        ] {
            script.push_str(&format!(
                "    println!(\"cargo:rerun-if-env-changed={v}\");\n"
            ));
        }
        script.push_str("}\n");
        std::fs::write(ws.join("build.rs"), script).unwrap();
        std::fs::write(ws.join("src/lib.rs"), "//! probe\npub fn f() {}\n").unwrap();
        let build = InnerBuild {
            cargo: env!("CARGO").into(),
            workspace: ws,
            target_dir: tmp.path().join("target"),
            profile: "debug".into(),
            packages: vec!["probe"],
        };
        // `fresh` of each artifact cargo reports.
        let fresh = |env: Vec<(std::ffi::OsString, std::ffi::OsString)>| -> Vec<bool> {
            let out = build
                .command(env)
                .args(["--offline", "--message-format=json"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["reason"] == "compiler-artifact")
                .map(|v| v["fresh"].as_bool().unwrap())
                .collect()
        };
        let first = fresh(as_run_by("verge-cli"));
        assert!(!first.is_empty() && first.iter().all(|f| !f), "{first:?}");
        let second = fresh(as_run_by("verge-cloud"));
        assert!(
            !second.is_empty() && second.iter().all(|f| *f),
            "the second build compiled again: {second:?}"
        );
    }
}
