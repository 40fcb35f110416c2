//! Side files of the Verge daemons (sessions, twins, identity caches, agent
//! state, keys, the cloud's secrets): one way to write them and one way to
//! load them.
//!
//! * [`write_atomic`] writes a temporary file in the same directory, fsyncs
//!   it, renames it over the target and fsyncs the directory, so a crash
//!   leaves the old file or the new one, never half of one, and a caller that
//!   acknowledges after it returns acknowledges something on disk. Files are
//!   created 0600 (they hold keys, tokens and client data) unless a mode is
//!   given ([`write_atomic_mode`]).
//! * [`create_private_dir`] makes a data directory 0700; [`restrict_umask`]
//!   makes whatever else the process creates the owner's only.
//! * [`load_json`] reads a side file at start; a file that is empty or does
//!   not parse is moved aside to `<name>.damaged-<UTC time>` with a warning
//!   naming both paths, and the daemon starts without it instead of refusing
//!   to start. Every I/O error names the file.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;

/// Mode of files written by [`write_atomic`]: owner read/write only.
pub const FILE_MODE: u32 = 0o600;
/// Mode of data directories made by [`create_private_dir`].
pub const DIR_MODE: u32 = 0o700;

/// `e` with `what` and `path` in its message (same kind).
fn named(e: std::io::Error, what: &str, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `bytes` to `path` atomically and durably, mode 0600 (blocking).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, bytes, FILE_MODE)
}

/// [`write_atomic`] with the given file mode (blocking). The parent
/// directory must exist.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = parent_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per process and call: two writers of one file never share a
    // temporary file (the later rename wins, both complete).
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| named(e, "creating", &tmp))?;
        // The umask may have removed bits the caller asked for.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| named(e, "setting the mode of", &tmp))?;
        f.write_all(bytes).map_err(|e| named(e, "writing", &tmp))?;
        f.sync_all().map_err(|e| named(e, "syncing", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| named(e, "replacing", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_dir(dir)
}

/// Fsyncs directory `dir`, making a rename or removal in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let d = std::fs::File::open(dir).map_err(|e| named(e, "opening", dir))?;
    match d.sync_all() {
        Ok(()) => Ok(()),
        // Some file systems refuse fsync on a directory; nothing more can be done there.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
        Err(e) => Err(named(e, "syncing", dir)),
    }
}

/// Removes `path` durably (missing is fine) (blocking).
pub fn remove_durable(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(parent_of(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(named(e, "removing", path)),
    }
}

/// [`write_atomic`] on the blocking pool, for async callers.
pub async fn write_atomic_async(path: PathBuf, bytes: Vec<u8>) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
        .await
        .map_err(std::io::Error::other)?
}

/// [`remove_durable`] on the blocking pool, for async callers.
pub async fn remove_durable_async(path: PathBuf) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || remove_durable(&path))
        .await
        .map_err(std::io::Error::other)?
}

/// Creates `dir` (and missing parents) and makes it 0700, also when it
/// already existed with a wider mode (blocking). A directory this process
/// does not own (a volume mounted by someone else) keeps its mode, with a
/// warning: refusing to start over it would help nobody.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| named(e, "creating", dir))?;
    match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot make the directory private (not its owner)");
            Ok(())
        }
        Err(e) => Err(named(e, "setting the mode of", dir)),
    }
}

/// A file name for `key` (a client id, a twin id): its SHA-256 in hex, then
/// `.ext`. Ids may hold `/` and be longer than a file name may be; the file
/// keeps the id itself inside.
pub fn keyed_file_name(key: &str, ext: &str) -> String {
    use sha2::Digest as _;
    use std::fmt::Write as _;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let mut name = String::with_capacity(65 + ext.len());
    for b in digest {
        let _ = write!(name, "{b:02x}");
    }
    name.push('.');
    name.push_str(ext);
    name
}

/// Makes every file and directory this process creates from now on the
/// owner's only (umask 077), whatever library creates it (the message store,
/// the cloud's database). For daemons whose files all hold client data or
/// keys; files meant for others get their mode set explicitly.
pub fn restrict_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Moves a damaged `path` aside to `<name>.damaged-<UTC time>` in the same
/// directory and returns the new path (blocking).
pub fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .map_err(std::io::Error::other)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = parent_of(path);
    let mut target = dir.join(format!("{name}.damaged-{stamp}"));
    let mut n = 1;
    // Never overwrite an earlier damaged copy (two in one second).
    while target.exists() {
        target = dir.join(format!("{name}.damaged-{stamp}-{n}"));
        n += 1;
    }
    std::fs::rename(path, &target).map_err(|e| named(e, "moving aside", path))?;
    sync_dir(dir)?;
    Ok(target)
}

/// Loads a JSON side file (blocking). `Ok(None)`: no file, or a damaged
/// one (empty, not JSON, not the expected shape) that was moved aside with a
/// warning naming it. Errors (unreadable file) name the file.
pub fn load_json<T: DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(named(e, "reading", path)),
    };
    let error = if bytes.iter().all(u8::is_ascii_whitespace) {
        "the file is empty".to_owned()
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => return Ok(Some(v)),
            Err(e) => e.to_string(),
        }
    };
    let moved = move_aside(path)?;
    tracing::warn!(
        file = %path.display(),
        moved_to = %moved.display(),
        %error,
        "damaged file moved aside; starting without it"
    );
    Ok(None)
}

/// [`load_json`] on the blocking pool, for async callers.
pub async fn load_json_async<T: DeserializeOwned + Send + 'static>(
    path: PathBuf,
) -> std::io::Result<Option<T>> {
    tokio::task::spawn_blocking(move || load_json(&path))
        .await
        .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeMap;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn write_atomic_replaces_with_a_private_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        std::fs::write(&p, b"old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(mode(&p), 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        write_atomic_mode(&p, b"x", 0o644).unwrap();
        assert_eq!(mode(&p), 0o644);
    }

    #[test]
    fn a_failed_write_names_the_file_and_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing-dir").join("a.json");
        let e = write_atomic(&p, b"x").unwrap_err();
        assert!(e.to_string().contains("a.json"), "{e}");
    }

    #[test]
    fn private_dirs_are_0700_even_if_they_existed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("x/y");
        create_private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
    }

    #[test]
    fn damaged_files_are_moved_aside_and_good_ones_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        assert!(load_json::<BTreeMap<String, u32>>(&p).unwrap().is_none());
        for bad in [&b""[..], b"  \n", b"{\"a\": 1", b"[1, 2]"] {
            std::fs::write(&p, bad).unwrap();
            assert!(load_json::<BTreeMap<String, u32>>(&p).unwrap().is_none());
            assert!(!p.exists());
        }
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(aside.len(), 4, "{aside:?}");
        assert!(aside.iter().all(|n| n.starts_with("s.json.damaged-")));
        std::fs::write(&p, b"{\"a\": 1}").unwrap();
        let v: BTreeMap<String, u32> = load_json(&p).unwrap().unwrap();
        assert_eq!(v["a"], 1);
    }
}
