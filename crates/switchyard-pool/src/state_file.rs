//! The state file: runtime state written atomically before an admin change is acknowledged,
//! and read back at start. A corrupt file is never deleted: it is moved aside and the start
//! goes on from the config alone. The same code writes the upgrade hand-over file.
//!
//! The file's directory may be shared with other programs, so nothing here may be turned into
//! a write somewhere else:
//! - the temp file is created exclusively (`O_CREAT | O_EXCL`, which never follows a link)
//!   under a name nobody can predict, so a link planted in the directory is never written
//!   through;
//! - the path itself may be a symbolic link (a state file on a mounted volume): reads and
//!   writes go to its final target, so the link stays a link. A link owned by another user is
//!   refused, as the kernel's `protected_symlinks` does in sticky directories: it is how a
//!   planted link looks;
//! - temp files carry the writer's pid: those of a process that died mid-save are removed at
//!   the next start, those of a live one (the old process during an upgrade) are left alone;
//! - a corrupt file is kept under a name not taken yet (a hard link, which never replaces), so
//!   a second corrupt file never overwrites the first kept copy.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{error, info, warn};

use crate::state::{RuntimeState, STATE_FORMAT};

/// More links than this in a row is a loop (the kernel's own limit).
const MAX_LINKS: usize = 40;
/// A fresh state file is ours alone; an existing one keeps the mode it has.
const NEW_FILE_MODE: u32 = 0o600;

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
    /// is kept as `<name>.corrupt-<unix seconds>[-<n>]` and the reason logged). Removes the
    /// temp files that dead processes left next to it first. `Err` only for a file a newer
    /// binary wrote: starting without it would undo its changes at the next save, and it is
    /// not corrupt, so the start is refused instead.
    pub fn load(&self) -> Result<RuntimeState, String> {
        let target = match target(&self.path) {
            Ok(target) => target,
            Err(e) => {
                error!(
                    "cannot read state file {}: {e}; starting from the config alone",
                    self.path.display()
                );
                return Ok(RuntimeState::default());
            }
        };
        remove_stale_temp_files(&target);
        let text = match fs::read(&target) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                info!(
                    "state file {} does not exist yet; starting from the config",
                    self.path.display()
                );
                return Ok(RuntimeState::default());
            }
            Err(e) => {
                error!(
                    "cannot read state file {}: {e}; starting from the config alone",
                    self.path.display()
                );
                return Ok(RuntimeState::default());
            }
        };
        if let Some(format) = newer_format(&text) {
            return Err(format!(
                "state file {} has format {format}, written by a newer Switchyard; this binary reads formats up to {STATE_FORMAT}. Run the newer binary, or move the file away to start from the config alone",
                self.path.display()
            ));
        }
        match serde_json::from_slice(&text) {
            Ok(state) => Ok(state),
            Err(e) => {
                match move_aside(&target) {
                    Ok(aside) => error!(
                        "state file {} is corrupt ({e}); kept as {} and starting from the config alone",
                        self.path.display(),
                        aside.display()
                    ),
                    Err(moving) => error!(
                        "state file {} is corrupt ({e}) and could not be moved aside ({moving}); starting from the config alone",
                        self.path.display()
                    ),
                }
                Ok(RuntimeState::default())
            }
        }
    }

    /// Writes the state so that a crash leaves either the old or the new file, never half:
    /// temp file in the target's directory, fsync, rename over, fsync the directory.
    pub fn save(&self, state: &RuntimeState) -> Result<(), String> {
        let fail = |what: &str, e: io::Error| {
            format!(
                "cannot save state file {}: {what}: {e}",
                self.path.display()
            )
        };
        let target = target(&self.path).map_err(|e| fail("follow symbolic link", e))?;
        let mut value = serde_json::to_value(state).map_err(|e| e.to_string())?;
        // In the oldest format that holds the state (see `STATE_FORMAT`): without rollouts and
        // retiring backends format 1 (no `format` field), which the binaries from before
        // rollouts read, so a downgrade keeps splits and drains.
        if let Some(fields) = value.as_object_mut() {
            match state.oldest_format() {
                1 => drop(fields.remove("format")),
                format => drop(fields.insert("format".into(), format.into())),
            }
        }
        let body = serde_json::to_vec_pretty(&value).map_err(|e| e.to_string())?;
        // An existing file keeps its mode (an operator may have opened it to a group).
        let mode = match fs::metadata(&target) {
            Ok(meta) => Some(meta.permissions().mode() & 0o7777),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(fail("inspect", e)),
        };
        let (temp, mut file) = create_temp(&target).map_err(|e| fail("create temp file", e))?;
        let written = mode
            .map_or(Ok(()), |mode| {
                file.set_permissions(fs::Permissions::from_mode(mode))
            })
            .and_then(|()| file.write_all(&body))
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all())
            .map_err(|e| fail("write temp file", e))
            .and_then(|()| fs::rename(&temp, &target).map_err(|e| fail("rename", e)));
        drop(file);
        if written.is_err() {
            let _ = fs::remove_file(&temp);
            return written;
        }
        // The new file is in place; failing to sync the directory only weakens durability
        // across a power cut, so the change stands and the failure is logged.
        if let Err(e) = File::open(directory(&target)).and_then(|d| d.sync_all()) {
            warn!("{}", fail("sync directory", e));
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` whole or not at all, as a save writes the state file (its links
/// followed as `target` allows, temp file created exclusively, fsync, rename, fsync of the
/// directory), for the other files one process hands the next.
pub(crate) fn write_whole(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let target = target(path)?;
    let (temp, mut file) = create_temp(&target)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&temp, &target));
    if written.is_err() {
        let _ = fs::remove_file(&temp);
        return written;
    }
    // In place already: a failed sync only weakens durability across a power cut.
    if let Err(e) = File::open(directory(&target)).and_then(|d| d.sync_all()) {
        warn!("cannot sync the directory of {}: {e}", target.display());
    }
    Ok(())
}

/// Reads what [`write_whole`] wrote at `path`, if anything: the target it read (to remove
/// once taken) and at most `max` bytes of it (a larger file is an error, not read whole).
/// Only a regular file of this user or root, reached through the links `target` allows and
/// opened without following a link put in their place meanwhile: a file planted in a shared
/// directory, a device or a FIFO (which would block the start) is refused.
pub(crate) fn read_whole(path: &Path, max: u64) -> io::Result<Option<(PathBuf, Vec<u8>)>> {
    let target = target(path)?;
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&target)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let euid = effective_uid();
    if !meta.is_file() {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            target.display()
        )));
    }
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is owned by uid {}, not by this process's uid {euid} or root; refusing to read it",
                target.display(),
                meta.uid()
            ),
        ));
    }
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {max} bytes", target.display()),
        ));
    }
    Ok(Some((target, bytes)))
}

/// The format of a state file newer than [`STATE_FORMAT`], read before the rest, whose fields
/// this binary may not know.
fn newer_format(text: &[u8]) -> Option<u32> {
    #[derive(serde::Deserialize)]
    struct Format {
        format: Option<u32>,
    }
    let format = serde_json::from_slice::<Format>(text).ok()?.format?;
    (format > STATE_FORMAT).then_some(format)
}

/// Where reads and writes of `path` go: its last component's links followed to the end (the
/// last one may dangle: a save creates its target).
pub(crate) fn target(path: &Path) -> io::Result<PathBuf> {
    let euid = effective_uid();
    let mut current = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        let meta = match fs::symlink_metadata(&current) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(current),
            Err(e) => return Err(e),
        };
        if !meta.file_type().is_symlink() {
            return Ok(current);
        }
        if meta.uid() != euid && meta.uid() != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is a symbolic link owned by uid {}, not by this process's uid {euid} or root; refusing to follow it",
                    current.display(),
                    meta.uid()
                ),
            ));
        }
        let link = fs::read_link(&current)?;
        // An absolute link replaces the whole path in `join`; a relative one is relative to
        // the link's own directory.
        current = directory(&current).join(link);
    }
    Err(io::Error::other(format!(
        "{}: more than {MAX_LINKS} symbolic links in a row",
        path.display()
    )))
}

/// The directory `file` is in (`.` for a bare file name).
fn directory(file: &Path) -> PathBuf {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `<file>` with `suffix` appended to its name.
fn with_suffix(file: &Path, suffix: &str) -> PathBuf {
    let mut name = file.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Temp files of `target` are `<name>.tmp-<pid>-<random>`.
fn temp_prefix(target: &Path) -> Option<OsString> {
    let mut prefix = target.file_name()?.to_os_string();
    prefix.push(".tmp-");
    Some(prefix)
}

/// A new temp file next to `target`, created exclusively: never an existing file, never
/// through a link.
fn create_temp(target: &Path) -> io::Result<(PathBuf, File)> {
    let random = RandomState::new();
    for attempt in 0u32..16 {
        let temp = with_suffix(
            target,
            &format!(
                ".tmp-{}-{:016x}",
                std::process::id(),
                random.hash_one((SystemTime::now(), attempt))
            ),
        );
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(NEW_FILE_MODE)
            .open(&temp)
        {
            Ok(file) => return Ok((temp, file)),
            // Someone else's file (or link) under that name: take another.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "16 temp file names in a row were taken",
    ))
}

/// Removes `target`'s temp files whose writer is no longer running (killed mid-save).
pub(crate) fn remove_stale_temp_files(target: &Path) {
    let (Some(prefix), Ok(entries)) = (temp_prefix(target), fs::read_dir(directory(target))) else {
        return;
    };
    let prefix = prefix.as_encoded_bytes();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.as_encoded_bytes().strip_prefix(prefix) else {
            continue;
        };
        // `<pid>-<random>`, or `<pid>` as older versions named them.
        let pid = rest.split(|&b| b == b'-').next().unwrap_or_default();
        let Some(pid) = std::str::from_utf8(pid)
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && process_alive(pid) {
            continue;
        }
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => info!(
                "removed {}, left by process {pid} which is no longer running",
                path.display()
            ),
            Err(e) => warn!("cannot remove stale temp file {}: {e}", path.display()),
        }
    }
}

/// Moves a corrupt `target` to `<target>.corrupt-<unix seconds>`, or `-<n>` after it when that
/// name is taken, and never over an existing file.
fn move_aside(target: &Path) -> io::Result<PathBuf> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    for n in 0u32..1000 {
        let aside = match n {
            0 => with_suffix(target, &format!(".corrupt-{stamp}")),
            n => with_suffix(target, &format!(".corrupt-{stamp}-{n}")),
        };
        match fs::hard_link(target, &aside) {
            Ok(()) => {
                fs::remove_file(target)?;
                return Ok(aside);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            // A file system without hard links: a rename checked just before (only a second
            // process doing the same at the same instant could slip in between).
            Err(_) if fs::symlink_metadata(&aside).is_err() => {
                fs::rename(target, &aside)?;
                return Ok(aside);
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "1000 names for the kept copy were taken",
    ))
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether process `pid` exists (one of another user counts: it may still be writing).
fn process_alive(pid: u32) -> bool {
    // Pid 0 and negative values would address process groups.
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "switchyard-state-file-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A pid that was just used and is no longer running.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let pid = child.id();
        child.wait().expect("wait");
        pid
    }

    #[test]
    fn a_link_planted_at_the_old_temp_name_is_not_written_through() {
        let dir = temp_dir("planted");
        let victim = dir.join("victim");
        fs::write(&victim, "precious").expect("victim");
        let path = dir.join("state.json");
        symlink(
            &victim,
            with_suffix(&path, &format!(".tmp-{}", std::process::id())),
        )
        .expect("plant");
        StateFile::new(path.clone())
            .save(&RuntimeState::default())
            .expect("save");
        assert_eq!(fs::read_to_string(&victim).expect("victim"), "precious");
        assert!(fs::read_to_string(&path).expect("state").starts_with('{'));
        fs::remove_dir_all(dir).expect("clean up");
    }

    #[test]
    fn a_symlinked_state_file_stays_a_link_and_its_target_is_written() {
        let dir = temp_dir("symlinked");
        fs::create_dir(dir.join("volume")).expect("volume");
        let path = dir.join("state.json");
        symlink("volume/state.json", &path).expect("link");
        let file = StateFile::new(path.clone());
        file.save(&RuntimeState::default()).expect("save");
        assert!(fs::symlink_metadata(&path)
            .expect("link")
            .file_type()
            .is_symlink());
        let written = fs::read_to_string(dir.join("volume/state.json")).expect("target");
        // Without rollouts it is written as format 1.
        assert_eq!(
            serde_json::from_str::<RuntimeState>(&written).expect("json"),
            RuntimeState {
                format: 1,
                ..RuntimeState::default()
            }
        );
        // A fresh file is the process's alone.
        let mode = fs::metadata(dir.join("volume/state.json"))
            .expect("target")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, NEW_FILE_MODE);
        // The corrupt target is moved aside, the link stays.
        fs::write(dir.join("volume/state.json"), "{ not json").expect("corrupt");
        assert_eq!(file.load(), Ok(RuntimeState::default()));
        assert!(fs::symlink_metadata(&path).is_ok());
        assert!(names(&dir.join("volume"))[0].starts_with("state.json.corrupt-"));
        fs::remove_dir_all(dir).expect("clean up");
    }

    #[test]
    fn a_handed_file_is_read_only_when_regular_ours_and_small_enough() {
        let dir = temp_dir("read-whole");
        let path = dir.join("upgrade.sock.state.json.keys");
        assert!(read_whole(&path, 10).expect("none yet").is_none());
        write_whole(&path, b"0123456789").expect("written");
        let (read, bytes) = read_whole(&path, 10).expect("read").expect("there");
        assert_eq!((read, &bytes[..]), (path.clone(), &b"0123456789"[..]));
        let too_large = read_whole(&path, 9).unwrap_err();
        assert_eq!(too_large.kind(), io::ErrorKind::InvalidData, "{too_large}");
        // A link of this user's is followed to its target, which a write keeps a link.
        fs::rename(&path, dir.join("real")).expect("move");
        symlink("real", &path).expect("link");
        write_whole(&path, b"again").expect("written through the link");
        assert!(fs::symlink_metadata(&path)
            .expect("link")
            .file_type()
            .is_symlink());
        let (read, bytes) = read_whole(&path, 10).expect("read").expect("there");
        assert_eq!((read, &bytes[..]), (dir.join("real"), &b"again"[..]));
        // A FIFO would block a plain open until someone writes to it.
        fs::remove_file(&path).expect("unlink");
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.expect("mkfifo").success());
        let fifo = read_whole(&path, 10).unwrap_err();
        assert!(fifo.to_string().contains("not a regular file"), "{fifo}");
        fs::remove_dir_all(dir).expect("clean up");
    }

    #[test]
    fn an_existing_file_keeps_its_mode() {
        let dir = temp_dir("mode");
        let path = dir.join("state.json");
        fs::write(&path, "{}").expect("state");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        StateFile::new(path.clone())
            .save(&RuntimeState::default())
            .expect("save");
        let mode = fs::metadata(&path).expect("state").permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        fs::remove_dir_all(dir).expect("clean up");
    }

    #[test]
    fn temp_files_of_dead_processes_go_at_start_those_of_live_ones_stay() {
        let dir = temp_dir("stale");
        let path = dir.join("state.json");
        let dead = dead_pid();
        fs::write(with_suffix(&path, &format!(".tmp-{dead}-00ff")), "half").expect("stale");
        fs::write(with_suffix(&path, &format!(".tmp-{dead}")), "half").expect("old style");
        // Pid 1 is always running.
        fs::write(with_suffix(&path, ".tmp-1-00ff"), "in progress").expect("live");
        fs::write(dir.join("other.tmp-1"), "not ours").expect("other");
        StateFile::new(path).load().expect("loads");
        assert_eq!(names(&dir), ["other.tmp-1", "state.json.tmp-1-00ff"]);
        fs::remove_dir_all(dir).expect("clean up");
    }

    #[test]
    fn a_second_corrupt_file_in_the_same_second_keeps_the_first_copy() {
        let dir = temp_dir("corrupt");
        let path = dir.join("state.json");
        let file = StateFile::new(path.clone());
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        // Every name of this second and the next few is taken by an earlier copy.
        for s in stamp..stamp + 5 {
            fs::write(
                with_suffix(&path, &format!(".corrupt-{s}")),
                format!("copy {s}"),
            )
            .expect("earlier copy");
        }
        fs::write(&path, "{ second").expect("corrupt");
        assert_eq!(file.load(), Ok(RuntimeState::default()));
        for s in stamp..stamp + 5 {
            let kept = fs::read_to_string(with_suffix(&path, &format!(".corrupt-{s}")));
            assert_eq!(kept.expect("kept"), format!("copy {s}"));
        }
        let new: Vec<String> = names(&dir)
            .into_iter()
            .filter(|n| n.matches('-').count() == 2)
            .collect();
        assert_eq!(new.len(), 1, "{:?}", names(&dir));
        assert_eq!(
            fs::read_to_string(dir.join(&new[0])).expect("new copy"),
            "{ second"
        );
        assert!(!path.exists());
        fs::remove_dir_all(dir).expect("clean up");
    }

    #[test]
    fn formats_are_read_or_refused_by_number() {
        let dir = temp_dir("formats");
        let path = dir.join("state.json");
        let file = StateFile::new(path.clone());
        // Format 1 had no `format` field: read as it is, and written back as the current one.
        fs::write(
            &path,
            r#"{"splits": {"web": {"split": {"blue": 1}, "file": {}}}}"#,
        )
        .expect("write");
        let old = file.load().expect("format 1 loads");
        assert_eq!(old.format, 1);
        assert_eq!(old.splits.len(), 1);
        file.save(&RuntimeState::default()).expect("save");
        // Without rollouts it stays readable by binaries of format 1.
        assert!(!fs::read_to_string(&path).expect("read").contains("format"));
        // A rollout is format 2, and one with a match step format 3 (which the binaries of
        // format 2 would take for corrupt).
        let config = switchyard_config::Config::from_yaml("listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  blue:\n    backends:\n      - address: 127.0.0.1:9001\n  green:\n    backends:\n      - address: 127.0.0.1:9002\nroutes:\n  - name: web\n    split: {blue: 1, green: 0}\n").expect("config");
        for (steps, want) in [
            ("[50]", 2),
            (r#"[{"match": {"headers": {"X-User-Group": "beta"}}}]"#, 3),
        ] {
            let spec = format!(r#"{{"to": "green", "steps": {steps}}}"#);
            let start = crate::Change::StartRollout {
                route: "web".into(),
                spec: Box::new(
                    switchyard_config::rollout::RolloutSpec::from_json(spec.as_bytes())
                        .expect("spec"),
                ),
            };
            let state = RuntimeState::default()
                .with_change(&config, &start, |_: &str, _| 0)
                .expect("started");
            file.save(&state).expect("save");
            let text = fs::read_to_string(&path).expect("read");
            assert!(!text.contains("paused_by_failure"), "{text}");
            let back = file.load().expect("load");
            assert_eq!((back.format, &back.rollouts), (want, &state.rollouts));
        }
        // A rollout held by a failure is format 5: format 4 has no such field and would take
        // the file for corrupt.
        let spec = switchyard_config::rollout::RolloutSpec::from_json(br#"{"to": "green"}"#)
            .expect("spec");
        let start = crate::Change::StartRollout {
            route: "web".into(),
            spec: Box::new(spec),
        };
        let mut held = RuntimeState::default()
            .with_change(&config, &start, |_: &str, _| 0)
            .expect("started");
        if let Some(rollout) = held.rollouts.get_mut("web") {
            rollout.state = crate::RolloutState::Paused;
            rollout.paused_by_failure = true;
        }
        file.save(&held).expect("save");
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.contains("\"format\": 5"), "{text}");
        let back = file.load().expect("load");
        assert_eq!((back.format, &back.rollouts), (5, &held.rollouts));
        assert!(back.rollouts["web"].held_by_failure());
        // A retiring backend is format 4: format 3 already meant match steps, and its
        // binaries would take a `retiring` state for corruption and set the file aside.
        let mut retiring = RuntimeState::default();
        let deadline =
            crate::Deadline::after(SystemTime::now(), std::time::Duration::from_secs(60));
        retiring
            .upstreams
            .entry("blue".into())
            .or_default()
            .changed
            .insert(
                "127.0.0.1:9001".parse().expect("address"),
                crate::state::BackendChange {
                    state: Some(crate::BackendState::Retiring { until: deadline }),
                    ..Default::default()
                },
            );
        file.save(&retiring).expect("save");
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.contains("\"format\": 4"), "{text}");
        let back = file.load().expect("load");
        assert_eq!((back.format, &back.upstreams), (4, &retiring.upstreams));
        // The local copy of a shared store's state carries its revision: format 6, which a
        // binary before shared stores refuses instead of setting the copy aside.
        let copy = RuntimeState {
            store_revision: Some(42),
            ..RuntimeState::default()
        };
        file.save(&copy).expect("save");
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.contains("\"format\": 6"), "{text}");
        assert_eq!(file.load().expect("load").store_revision, Some(42));
        assert_eq!(STATE_FORMAT, 6);
        // A newer format is refused, named, and left where it is.
        let newer = format!(
            r#"{{"format": {}, "splits": {{}}, "shiny": true}}"#,
            STATE_FORMAT + 1
        );
        fs::write(&path, &newer).expect("write");
        let refused = file.load().unwrap_err();
        assert!(refused.contains("newer Switchyard"), "{refused}");
        assert_eq!(fs::read_to_string(&path).expect("kept"), newer);
        assert_eq!(names(&dir), ["state.json"]);
        fs::remove_dir_all(dir).expect("clean up");
    }
}
