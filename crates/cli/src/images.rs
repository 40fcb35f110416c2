//! Module images and containers for `verge quickstart --docker`.
//!
//! Nothing can be assumed pullable, and the modules should be this build's,
//! so the images are made here from the binaries next to `verge`: one base
//! image holds the executables, the shared libraries they link (as `ldd`
//! resolves them on this machine, loader included) and an `nsswitch.conf`
//! that resolves names through `/etc/hosts` first; one small image per
//! module only sets its entrypoint on top of it, so Docker keeps a single
//! copy of the files.
//!
//! Containers are found again by the labels verged's Docker backend puts on
//! them: the owner label, and the module spec whose workload socket lies in
//! the quickstart's directory. Only those are ever removed.
//!
//! Every Docker call goes through verge-runtime's Docker backend (its
//! `images` module): only the runtime talks to the engine.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use verge_runtime::docker::{OWNER_LABEL, SPEC_LABEL};
use verge_runtime::{DockerConfig, DockerRuntime, ModuleSpec};

/// Tag of every image built here.
const TAG: &str = "local";
/// Repository of the base image.
const BASE: &str = "verge-quickstart/base";
/// Where the executables are in the images.
const BIN_DIR: &str = "/usr/local/bin";

/// An image to build: its repository, and the executable (and leading
/// arguments) it runs.
pub struct ImageSpec<'a> {
    /// Repository name, e.g. `verge-quickstart/edgehub`.
    pub repository: &'a str,
    /// The executable on this machine (copied into the base image).
    pub binary: &'a Path,
    /// Arguments that always follow the executable (the entrypoint's tail).
    pub entry_args: &'a [&'a str],
}

/// `repository:tag` of an image built here.
pub fn reference(repository: &str) -> String {
    format!("{repository}:{TAG}")
}

/// Connects to the local engine (as verged's Docker backend does, with its
/// default socket) and negotiates the API version.
pub async fn connect() -> anyhow::Result<DockerRuntime> {
    let runtime = DockerRuntime::new(DockerConfig::default());
    tokio::time::timeout(Duration::from_secs(10), runtime.client())
        .await
        .map_err(|_| anyhow!("--docker: the Docker engine did not answer within 10 s"))?
        .map_err(|e| anyhow!("--docker: {e} (is Docker installed and running?)"))?;
    Ok(runtime)
}

/// The shared libraries `ldd` resolves for `binary` (loader included);
/// empty for a static executable.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (from libc-bin) to find the shared libraries to copy")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd exits 1 for a static executable ("not a dynamic executable").
        if String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
            || text.contains("statically linked")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_ldd(&text).map_err(|e| anyhow!("ldd {}: {e}", binary.display()))
}

/// Paths in `ldd` output: `name => /path (0x…)` and `/path (0x…)`;
/// the vDSO has no file and is skipped.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            return Err(format!("a library is missing: {line}"));
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// One regular file or directory entry with the given contents.
fn append_bytes(
    tar: &mut tar::Builder<impl std::io::Write>,
    name: &str,
    data: &[u8],
    mode: u32,
    dir: bool,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    if dir {
        h.set_entry_type(tar::EntryType::Directory);
    }
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_cksum();
    tar.append_data(&mut h, name, data)
}

/// Writes the base image's build context (a tar) to `out`: the binaries in
/// `BIN_DIR`, their shared libraries at their paths on this machine.
fn write_base_context(binaries: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    let mut libs = BTreeSet::new();
    for b in binaries {
        libs.extend(shared_libraries(b)?);
    }
    let lib_dirs: BTreeSet<String> = libs
        .iter()
        .filter_map(|l| l.parent())
        .map(|d| d.display().to_string())
        .collect();
    let dockerfile = format!(
        "FROM scratch\nCOPY rootfs/ /\nENV LD_LIBRARY_PATH={}\n",
        lib_dirs.into_iter().collect::<Vec<_>>().join(":")
    );
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    // Links are archived as the files they point to (the loader's path is a
    // link on Debian).
    tar.follow_symlinks(true);
    // Docker's builder rejects GNU sparse entries (binaries can have holes).
    tar.sparse(false);
    append_bytes(&mut tar, "Dockerfile", dockerfile.as_bytes(), 0o644, false)?;
    append_bytes(
        &mut tar,
        "rootfs/etc/nsswitch.conf",
        b"hosts: files dns\n",
        0o644,
        false,
    )?;
    append_bytes(&mut tar, "rootfs/tmp", b"", 0o1777, true)?;
    for b in binaries {
        let name = b
            .file_name()
            .ok_or_else(|| anyhow!("{} is not a file", b.display()))?;
        let inside = Path::new("rootfs")
            .join(BIN_DIR.trim_start_matches('/'))
            .join(name);
        tar.append_path_with_name(b, inside)
            .with_context(|| format!("adding {}", b.display()))?;
    }
    for l in &libs {
        let inside = Path::new("rootfs").join(l.strip_prefix("/").unwrap_or(l));
        tar.append_path_with_name(l, inside)
            .with_context(|| format!("adding {}", l.display()))?;
    }
    let mut w = tar
        .into_inner()
        .with_context(|| format!("writing {}", out.display()))?;
    std::io::Write::flush(&mut w).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Builds the base image and one image per entry of `images`.
/// `scratch_dir` holds the (large) build context while it is sent.
pub async fn build(
    docker: &DockerRuntime,
    images: &[ImageSpec<'_>],
    scratch_dir: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(scratch_dir)
        .with_context(|| format!("creating {}", scratch_dir.display()))?;
    let context = scratch_dir.join("base-context.tar");
    let binaries: Vec<PathBuf> = images.iter().map(|i| i.binary.to_path_buf()).collect();
    let out = context.clone();
    // Reading and archiving a few hundred MB is blocking work.
    tokio::task::spawn_blocking(move || write_base_context(&binaries, &out))
        .await
        .map_err(|e| anyhow!("archiving the binaries: {e}"))??;
    // Streamed from the file: a debug build's context is several hundred MB.
    let base = reference(BASE);
    let result = docker.build_image_from_file(&base, &context).await;
    let _ = tokio::fs::remove_file(&context).await;
    result.map_err(|e| anyhow!("{e}"))?;

    for i in images {
        let name = i
            .binary
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("{} has no UTF-8 file name", i.binary.display()))?;
        let mut entry = vec![format!("{BIN_DIR}/{name}")];
        entry.extend(i.entry_args.iter().map(|s| (*s).to_owned()));
        let dockerfile = format!(
            "FROM {}\nENTRYPOINT {}\n",
            reference(BASE),
            serde_json::to_string(&entry)?
        );
        let mut tar = tar::Builder::new(Vec::new());
        append_bytes(&mut tar, "Dockerfile", dockerfile.as_bytes(), 0o644, false)?;
        let bytes = tar.into_inner()?;
        let tag = reference(i.repository);
        docker
            .build_image(&tag, bytes.into())
            .await
            .map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

/// The images built here for `repositories`, module images first (they
/// stand on the base image).
fn references(repositories: &[&str]) -> Vec<String> {
    let mut refs: Vec<String> = repositories.iter().map(|r| reference(r)).collect();
    refs.push(reference(BASE));
    refs
}

/// What the images built for `repositories` take on disk, in bytes (the
/// module images share the base image's layers: the largest counts), or
/// `None` if none is there.
pub async fn images_size(docker: &DockerRuntime, repositories: &[&str]) -> Option<u64> {
    let mut size = None;
    for r in references(repositories) {
        if let Ok(Some(s)) = docker.image_size(&r).await {
            size = Some(size.unwrap_or(0).max(s));
        }
    }
    size
}

/// What [`clean`] removed.
#[derive(Debug, Default)]
pub struct Cleaned {
    /// References of the images removed.
    pub images: Vec<String>,
    /// Bytes the largest of them took (the others share its layers).
    pub bytes: u64,
    /// Whether the module network was removed.
    pub network: bool,
}

/// Removes what `--docker` leaves for the next run: the images built here
/// for `repositories` (and the base image) and the module network, if a
/// verged made it. Through verged's Docker backend, as the daemon would.
pub async fn clean(repositories: &[&str]) -> anyhow::Result<Cleaned> {
    let runtime = DockerRuntime::new(DockerConfig::default());
    let mut out = Cleaned::default();
    for r in references(repositories) {
        if let Some(bytes) = runtime
            .remove_image(&r)
            .await
            .map_err(|e| anyhow!("removing image {r}: {e}"))?
        {
            out.bytes = out.bytes.max(bytes);
            out.images.push(r);
        }
    }
    out.network = runtime.remove_network().await.map_err(|e| {
        anyhow!(
            "removing the Docker network {}: {e}",
            runtime.config().network
        )
    })?;
    Ok(out)
}

/// Whether the container is one of this quickstart's/// Whether the container is one of this quickstart's: made by a verged
/// (owner label) for a module whose workload socket is under `dir`.
fn is_ours(labels: Option<&std::collections::HashMap<String, String>>, dir: &Path) -> bool {
    let Some(labels) = labels else {
        return false;
    };
    if !labels.contains_key(OWNER_LABEL) {
        return false;
    }
    labels
        .get(SPEC_LABEL)
        .and_then(|s| serde_json::from_str::<ModuleSpec>(s).ok())
        .and_then(|spec| spec.workload_socket)
        .is_some_and(|sock| sock.starts_with(dir))
}

/// Stops and removes the containers named `names` that this quickstart
/// (working directory `dir`) created, all at once. Fails, naming it, on a
/// container of that name that belongs to someone else: it would clash with
/// the deployment and is not ours to remove.
pub async fn remove_ours(
    docker: &DockerRuntime,
    names: &[&str],
    dir: &Path,
) -> anyhow::Result<usize> {
    let results =
        futures_util::future::join_all(names.iter().map(|n| remove_one(docker, n, dir))).await;
    let mut removed = 0;
    for r in results {
        removed += usize::from(r?);
    }
    Ok(removed)
}

/// [`remove_ours`] for one name: whether a container was removed.
async fn remove_one(docker: &DockerRuntime, name: &str, dir: &Path) -> anyhow::Result<bool> {
    let labels = match docker.container_labels(name).await {
        Ok(Some(labels)) => labels,
        Ok(None) => return Ok(false),
        Err(e) => bail!("inspecting container {name}: {e}"),
    };
    if !is_ours(Some(&labels), dir) {
        bail!(
            "a Docker container named {name} exists and is not this quickstart's \
             (another IoT Edge or Verge on this engine?); module names are container \
             names, so the deployment would clash. Remove it (docker rm -f {name}) or \
             run without --docker"
        );
    }
    // SIGTERM first: the hub closes its store cleanly.
    docker
        .stop_and_remove_container(name, Duration::from_secs(10))
        .await
        .map_err(|e| anyhow!("removing container {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        let missing = "\tlibfoo.so.1 => not found\n";
        assert!(parse_ldd(missing).unwrap_err().contains("libfoo"));
    }

    #[test]
    fn ownership_is_by_label_and_directory() {
        let spec = |sock: &str| ModuleSpec {
            name: "edgeHub".into(),
            image: "i".into(),
            create_options: serde_json::json!({}),
            env: Default::default(),
            labels: Default::default(),
            workload_socket: Some(PathBuf::from(sock)),
            management_socket: None,
        };
        let labels = |sock: &str, owner: bool| {
            let mut m = std::collections::HashMap::new();
            if owner {
                m.insert(OWNER_LABEL.to_owned(), "verged".to_owned());
            }
            m.insert(
                SPEC_LABEL.to_owned(),
                serde_json::to_string(&spec(sock)).unwrap(),
            );
            m
        };
        let dir = Path::new("/tmp/qs");
        assert!(is_ours(
            Some(&labels("/tmp/qs/edge/home/mnt/edgeHub.sock", true)),
            dir
        ));
        assert!(!is_ours(
            Some(&labels("/var/lib/verge/mnt/edgeHub.sock", true)),
            dir
        ));
        assert!(!is_ours(
            Some(&labels("/tmp/qs/edge/home/mnt/edgeHub.sock", false)),
            dir
        ));
        assert!(!is_ours(None, dir));
    }
}
