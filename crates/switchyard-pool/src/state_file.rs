//! The state file: runtime state written atomically before an admin change is acknowledged,
//! and read back at start. A corrupt file is never deleted: it is moved aside and the start
//! goes on from the config alone.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{error, info};

use crate::state::RuntimeState;

pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: PathBuf) -> StateFile {
        StateFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; empty when there is none yet, or when the file was corrupt (then it
    /// is kept as `<name>.corrupt-<unix seconds>` and the reason logged).
    pub fn load(&self) -> RuntimeState {
        let text = match fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                info!(
                    "state file {} does not exist yet; starting from the config",
                    self.path.display()
                );
                return RuntimeState::default();
            }
            Err(e) => {
                error!(
                    "cannot read state file {}: {e}; starting from the config alone",
                    self.path.display()
                );
                return RuntimeState::default();
            }
        };
        match serde_json::from_slice(&text) {
            Ok(state) => state,
            Err(e) => {
                let stamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                let mut aside = self.path.clone().into_os_string();
                aside.push(format!(".corrupt-{stamp}"));
                let aside = PathBuf::from(aside);
                match fs::rename(&self.path, &aside) {
                    Ok(()) => error!(
                        "state file {} is corrupt ({e}); kept as {} and starting from the config alone",
                        self.path.display(),
                        aside.display()
                    ),
                    Err(rename) => error!(
                        "state file {} is corrupt ({e}) and could not be moved aside ({rename}); starting from the config alone",
                        self.path.display()
                    ),
                }
                RuntimeState::default()
            }
        }
    }

    /// Writes the state so that a crash leaves either the old or the new file, never half:
    /// temp file in the same directory, fsync, rename over, fsync the directory.
    pub fn save(&self, state: &RuntimeState) -> Result<(), String> {
        let fail = |what: &str, e: std::io::Error| {
            format!(
                "cannot save state file {}: {what}: {e}",
                self.path.display()
            )
        };
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut temp = self.path.clone().into_os_string();
        temp.push(format!(".tmp-{}", std::process::id()));
        let temp = PathBuf::from(temp);
        let body = serde_json::to_vec_pretty(state).map_err(|e| e.to_string())?;
        let written = File::create(&temp)
            .and_then(|mut file| {
                file.write_all(&body)?;
                file.write_all(b"\n")?;
                file.sync_all()
            })
            .map_err(|e| fail("write temp file", e))
            .and_then(|()| fs::rename(&temp, &self.path).map_err(|e| fail("rename", e)));
        if written.is_err() {
            let _ = fs::remove_file(&temp);
            return written;
        }
        // The new file is in place; failing to sync the directory only weakens durability
        // across a power cut, so the change stands and the failure is logged.
        if let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
            log::warn!("{}", fail("sync directory", e));
        }
        Ok(())
    }
}
