//! `server.pid_file`: the pid of the process that serves, for scripts (`deploy/upgrade.sh`)
//! that would otherwise be given it. Written once the proxy serves, atomically (a temp file
//! beside it, renamed over), so a reader never sees half a number; the new process of a binary
//! upgrade writes it again with its own pid; removed at exit only while it still holds our
//! pid, so the old process of an upgrade, exiting last, leaves the new one's file alone.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use async_trait::async_trait;
use log::{error, info, warn};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

/// The pid file this process wrote, for the exit to remove.
static WRITTEN: OnceLock<PathBuf> = OnceLock::new();

/// Refuses a start whose pid file could not be written later, when the sockets are taken and
/// failing would leave no one listening: its directory must exist.
pub fn check(path: &Path) -> Result<(), String> {
    let dir = parent(path);
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(format!(
            "server.pid_file: {} is not a directory",
            dir.display()
        )),
        Err(e) => Err(format!(
            "server.pid_file: its directory {} cannot be used: {e}",
            dir.display()
        )),
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Writes `pid` to `path`: temp file in the same directory, then rename over.
pub fn write(path: &Path, pid: u32) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = parent(path).join(format!(".{name}.tmp-{pid}"));
    let result = write_new(&temp, pid).and_then(|()| std::fs::rename(&temp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// A new file only: whatever is already at `temp` (a stale temp file, or a link someone put
/// there to make us write through it) is removed, never followed.
fn write_new(temp: &Path, pid: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(temp)
    };
    let mut file = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(temp)?;
            open()?
        }
        other => other?,
    };
    file.write_all(format!("{pid}\n").as_bytes())
}

/// The pid a pid file holds, if it holds one.
pub fn read(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// At exit: removes the pid file this process wrote if it still names this process.
pub fn remove_if_ours() {
    let Some(path) = WRITTEN.get() else {
        return;
    };
    if read(path) == Some(std::process::id()) {
        if let Err(e) = std::fs::remove_file(path) {
            warn!("cannot remove pid file {}: {e}", path.display());
        }
    }
}

/// Writes the pid file once the proxy serves (its dependencies are the listeners).
pub struct WritePidFile(pub PathBuf);

#[async_trait]
impl BackgroundService for WritePidFile {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let pid = std::process::id();
        match write(&self.0, pid) {
            Ok(()) => {
                let _ = WRITTEN.set(self.0.clone());
                info!("pid {pid} written to {}", self.0.display());
            }
            Err(e) => error!("cannot write pid file {}: {e}", self.0.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sy-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn the_file_is_replaced_whole_and_read_back() {
        let path = dir().join("switchyard.pid");
        write(&path, 41).expect("write");
        write(&path, 42).expect("write again");
        assert_eq!(std::fs::read_to_string(&path).ok().as_deref(), Some("42\n"));
        assert_eq!(read(&path), Some(42));
        // No temp file is left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("switchyard.pid")]);
    }

    #[test]
    fn a_link_at_the_temp_name_is_replaced_not_written_through() {
        // A directory of its own: another test lists what is in `dir()`.
        let dir = dir().with_extension("linked");
        std::fs::create_dir_all(&dir).expect("dir");
        let target = dir.join("precious");
        std::fs::write(&target, "keep me").expect("target");
        let path = dir.join("linked.pid");
        std::os::unix::fs::symlink(&target, dir.join(".linked.pid.tmp-43")).expect("link");
        write(&path, 43).expect("write");
        assert_eq!(read(&path), Some(43));
        assert_eq!(std::fs::read_to_string(&target).expect("target"), "keep me");
    }

    #[test]
    fn a_missing_directory_is_refused_at_start() {
        let missing = dir().join("nope/switchyard.pid");
        let e = check(&missing).expect_err("no directory");
        assert!(
            e.starts_with(&format!(
                "server.pid_file: its directory {} cannot be used: ",
                missing.parent().expect("dir").display()
            )),
            "{e}"
        );
        assert!(check(&dir().join("switchyard.pid")).is_ok());
    }
}
