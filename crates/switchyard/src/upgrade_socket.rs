//! The upgrade socket: at SIGQUIT, Pingora connects to `server.upgrade_socket` and sends every
//! listening socket to whoever listens there. Whoever can create that file first receives
//! them, so this module makes sure nobody else can.
//!
//! - At start, in both modes and before Pingora binds anything, the socket's directory is
//!   created (mode 0700) when missing, and refused when another user could write it: it must
//!   be ours and writable by us alone, and every directory above it owned by root or us and
//!   writable by others only with the sticky bit (the rule of OpenSSH's `StrictModes`). Links
//!   on the way are followed, each owned by root or us. A directory others can enter is only
//!   warned about, by `run --upgrade` (the contract refuses what others can write): while it
//!   waits, they could connect to its socket first and make that upgrade fail (the old
//!   process then drains and exits with no successor); they cannot receive the sockets.
//! - At SIGQUIT, before the sockets go, the directory is checked again, and a socket file
//!   already there must be a socket bound by our own uid. Otherwise the handover is refused
//!   and the process keeps serving.
//!
//! Why the socket file's owner and not `SO_PEERCRED`: the new process (Pingora's
//! `get_fds_from`) accepts exactly one connection on that socket and takes its first message
//! as the handover. A connection of ours to read the peer's credentials would be that one
//! connection: the new process would get no sockets and give up. Checking the peer on the
//! connection Pingora itself sends on needs a change to Pingora (`send_fds_to` connects and
//! sends in one function). The owner of a socket file is the uid that bound it, and in a
//! directory only we (and root) can write, nobody else can replace it between our check and
//! Pingora's connect; so the file's owner says what `SO_PEERCRED` would.

use std::ffi::OsString;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use log::warn;

/// Field path for messages.
const FIELD: &str = "server.upgrade_socket";
/// More links than this on one path is a loop (the kernel's own limit).
const MAX_LINKS: usize = 40;
/// Mode bits that let group or other users write a directory.
const WRITABLE_BY_OTHERS: u32 = 0o022;
const STICKY: u32 = 0o1000;
/// Mode bits that let group or other users reach a file in a directory.
const SEARCHABLE_BY_OTHERS: u32 = 0o011;

/// At start, before Pingora binds or connects: the socket's directory exists (created 0700 if
/// missing) and only we can write it. `waiting`: this process is about to wait on the socket
/// (`--upgrade`), the one moment others who can enter the directory matter.
pub fn prepare(socket: &Path, waiting: bool) -> Result<(), String> {
    let dir = directory(socket);
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("{FIELD}: cannot create directory {}: {e}", dir.display()))?;
    }
    check_directory(&dir, effective_uid())?;
    // Pingora makes the socket 0666 while the new process waits: only the directory keeps
    // others from connecting first, which takes the one handover the new process accepts.
    if let (true, Ok(meta)) = (waiting, fs::metadata(&dir)) {
        if meta.mode() & SEARCHABLE_BY_OTHERS != 0 {
            warn!(
                "{FIELD}: directory {} can be entered by other users (mode {:04o}): while `run --upgrade` waits for the sockets they can connect first and make the upgrade fail; chmod 0700 it",
                dir.display(),
                meta.mode() & 0o7777
            );
        }
    }
    Ok(())
}

/// At SIGQUIT, before the listening sockets are sent: the directory is still safe, and the
/// socket there (if the new process has bound it yet) is our own uid's.
pub fn check_peer(socket: &Path) -> Result<(), String> {
    let euid = effective_uid();
    check_directory(&directory(socket), euid)?;
    match fs::symlink_metadata(socket) {
        // Not bound yet: Pingora waits for it, and only we or root can create it there.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{FIELD}: cannot inspect {}: {e}", socket.display())),
        Ok(meta) if !meta.file_type().is_socket() => Err(format!(
            "{FIELD}: {} is not a socket; refusing to hand the listening sockets over",
            socket.display()
        )),
        Ok(meta) if meta.uid() != euid => Err(format!(
            "{FIELD}: {} was bound by uid {}, not by this process's uid {euid}; refusing to hand the listening sockets over",
            socket.display(),
            meta.uid()
        )),
        Ok(_) => Ok(()),
    }
}

/// The directory the socket is in (`.` for a bare file name).
fn directory(socket: &Path) -> PathBuf {
    match socket.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Walks `dir` from `/` down, following links, and checks every directory on the way.
fn check_directory(dir: &Path, euid: u32) -> Result<(), String> {
    let absolute = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("{FIELD}: cannot resolve {}: {e}", dir.display()))?
            .join(dir)
    };
    let inspect = |path: &Path| {
        fs::symlink_metadata(path)
            .map_err(|e| format!("{FIELD}: cannot inspect {}: {e}", path.display()))
    };
    let root = PathBuf::from("/");
    check_ancestor(&root, &inspect(&root)?, euid)?;
    // Components still to walk, first at the end (links put theirs back).
    let mut pending: Vec<OsString> = components(&absolute);
    pending.reverse();
    let mut current = root;
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            current.pop();
            continue;
        }
        let next = current.join(&part);
        let meta = inspect(&next)?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err(format!(
                    "{FIELD}: more than {MAX_LINKS} symbolic links in {}",
                    dir.display()
                ));
            }
            check_owner(&next, &meta, euid, "symbolic link")?;
            let target = fs::read_link(&next)
                .map_err(|e| format!("{FIELD}: cannot read link {}: {e}", next.display()))?;
            if target.is_absolute() {
                current = PathBuf::from("/");
            }
            let mut parts = components(&target);
            parts.reverse();
            pending.extend(parts);
            continue;
        }
        if !meta.is_dir() {
            return Err(format!("{FIELD}: {} is not a directory", next.display()));
        }
        if pending.is_empty() {
            check_own(&next, &meta, euid)?;
        } else {
            check_ancestor(&next, &meta, euid)?;
        }
        current = next;
    }
    Ok(())
}

/// The normal components of `path` (`.` dropped, `..` kept as is; the root is implied).
fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// The socket's own directory: ours, and nobody else may create a file in it.
fn check_own(dir: &Path, meta: &fs::Metadata, euid: u32) -> Result<(), String> {
    if meta.uid() != euid {
        return Err(format!(
            "{FIELD}: directory {} is owned by uid {}, not by this process's uid {euid}; whoever owns it can take over the listening sockets at an upgrade",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & WRITABLE_BY_OTHERS != 0 {
        return Err(format!(
            "{FIELD}: directory {} is writable by other users (mode {:04o}); whoever can write it can take over the listening sockets at an upgrade (chmod go-w, or use a directory of its own)",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// A directory above it: nobody else may rename what is below it.
fn check_ancestor(dir: &Path, meta: &fs::Metadata, euid: u32) -> Result<(), String> {
    check_owner(dir, meta, euid, "directory")?;
    if meta.mode() & WRITABLE_BY_OTHERS != 0 && meta.mode() & STICKY == 0 {
        return Err(format!(
            "{FIELD}: directory {} is writable by other users (mode {:04o}) and not sticky; they could replace the directories below it",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

fn check_owner(path: &Path, meta: &fs::Metadata, euid: u32, what: &str) -> Result<(), String> {
    if meta.uid() == euid || meta.uid() == 0 {
        return Ok(());
    }
    Err(format!(
        "{FIELD}: {what} {} is owned by uid {}, neither root nor this process's uid {euid}",
        path.display(),
        meta.uid()
    ))
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "switchyard-upgrade-socket-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        dir
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn a_missing_directory_is_created_for_us_alone() {
        let dir = temp_dir("missing");
        let socket = dir.join("run/switchyard/upgrade.sock");
        prepare(&socket, false).expect("created");
        for created in ["run", "run/switchyard"] {
            let mode = fs::metadata(dir.join(created)).expect("dir").mode();
            assert_eq!(mode & 0o777, 0o700, "{created}");
        }
        // And a second start finds it fine.
        prepare(&socket, false).expect("again");
        fs::remove_dir_all(dir).expect("clean up");
    }

    #[test]
    fn a_directory_others_can_write_is_refused_naming_it() {
        let dir = temp_dir("writable");
        let shared = dir.join("shared");
        fs::create_dir(&shared).expect("shared");
        chmod(&shared, 0o777);
        let e = prepare(&shared.join("upgrade.sock"), false).expect_err("refused");
        assert!(e.starts_with("server.upgrade_socket: directory "), "{e}");
        assert!(
            e.contains(&format!(
                "{} is writable by other users (mode 0777)",
                shared.display()
            )),
            "{e}"
        );
        // Sticky does not help the socket's own directory: the name can still be taken first.
        chmod(&shared, 0o1777);
        assert!(prepare(&shared.join("upgrade.sock"), false).is_err());
        // Group-writable is other users too.
        chmod(&shared, 0o770);
        assert!(prepare(&shared.join("upgrade.sock"), false).is_err());
        fs::remove_dir_all(dir).expect("clean up");
    }

    #[test]
    fn above_it_a_sticky_directory_is_fine_a_writable_one_is_not() {
        let dir = temp_dir("ancestor");
        let below = dir.join("shared/mine");
        fs::create_dir_all(&below).expect("dirs");
        chmod(&below, 0o700);
        chmod(&dir.join("shared"), 0o1777);
        prepare(&below.join("upgrade.sock"), false).expect("sticky above is fine");
        chmod(&dir.join("shared"), 0o777);
        let e = prepare(&below.join("upgrade.sock"), false).expect_err("refused");
        assert!(e.contains("and not sticky"), "{e}");
        fs::remove_dir_all(dir).expect("clean up");
    }

    #[test]
    fn links_are_followed_and_their_target_checked() {
        let dir = temp_dir("links");
        let real = dir.join("real");
        fs::create_dir(&real).expect("real");
        symlink("real", dir.join("link")).expect("link");
        prepare(&dir.join("link/upgrade.sock"), false).expect("safe target");
        chmod(&real, 0o777);
        let e = prepare(&dir.join("link/upgrade.sock"), false).expect_err("refused");
        assert!(
            e.contains(&format!("{} is writable", real.display())),
            "{e}"
        );
        fs::remove_dir_all(dir).expect("clean up");
    }

    #[test]
    fn at_sigquit_only_a_socket_of_our_own_uid_gets_the_sockets() {
        let dir = temp_dir("peer");
        let socket = dir.join("upgrade.sock");
        check_peer(&socket).expect("not bound yet: Pingora waits for it");
        fs::write(&socket, "").expect("file");
        let e = check_peer(&socket).expect_err("not a socket");
        assert!(e.contains("is not a socket"), "{e}");
        fs::remove_file(&socket).expect("rm");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        check_peer(&socket).expect("our own socket");
        chmod(&dir, 0o777);
        assert!(
            check_peer(&socket).is_err(),
            "the directory is checked again"
        );
        fs::remove_dir_all(dir).expect("clean up");
    }
}
