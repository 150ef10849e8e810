//! The access log: one line per request, JSON or `combined`, to a file or stdout.
//!
//! The request path formats its line (see [`format`]) and hands it to a bounded channel
//! without waiting: when the writer falls behind (a slow disk, a blocked pipe), the line is
//! dropped and counted in `switchyard_access_log_dropped_total`, and the request goes on as if
//! nothing happened. The writer ([`writer`]) appends lines in batches in its own thread.
//!
//! Reload goes in two steps like the certificates': [`AccessLog::prepare`] opens a new path
//! (a path that cannot be opened refuses the reload and changes nothing), `commit` switches.
//! SIGUSR1 reopens the file under its path, for logrotate.

mod format;
mod writer;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use prometheus::IntCounter;
use switchyard_config::access_log::DEFAULT_BUFFER_LINES;
use switchyard_config::LogFormat;
use switchyard_pool::Metrics;

pub use format::{ip_text, write_line, Record};
use writer::{Command, Commands, Message, Output, Writer};

/// A line's buffer starts this big: a typical JSON line fits without growing.
const LINE_CAPACITY: usize = 384;
/// Written lines' buffers kept for reuse: about a poll's worth of lines at high rates.
const SPARE_BUFFERS: usize = 1024;

const OFF: u8 = 0;
const JSON: u8 = 1;
const COMBINED: u8 = 2;

pub struct AccessLog {
    /// What the request path does: [`OFF`], [`JSON`] or [`COMBINED`].
    mode: AtomicU8,
    lines: SyncSender<Message>,
    /// Buffers of written lines, reused: a line costs no allocation once traffic flows.
    spare: Arc<ArrayQueue<Vec<u8>>>,
    commands: Arc<Commands>,
    dropped: IntCounter,
    /// The settings running now, to tell what a reload changes.
    running: Mutex<Option<switchyard_config::AccessLog>>,
}

impl AccessLog {
    /// Opens the configured target and starts the writer (also without an access log, so
    /// that a reload can add one). The channel's size is fixed here, by the config at start.
    pub fn start(
        config: Option<&switchyard_config::AccessLog>,
        metrics: &Metrics,
    ) -> Result<Arc<AccessLog>, String> {
        let output = config.map(|c| Output::open(&c.target)).transpose()?;
        let dropped = IntCounter::new(
            "switchyard_access_log_dropped_total",
            "Access log lines dropped: the writer had fallen behind (a full buffer) or could not write them.",
        )
        .map_err(|e| format!("access log metric: {e}"))?;
        metrics.register(
            "switchyard_access_log_dropped_total",
            Box::new(dropped.clone()),
        );
        let capacity = config.map_or(DEFAULT_BUFFER_LINES, |c| c.buffer_lines);
        let (lines, receiver) = sync_channel(capacity);
        let spare = Arc::new(ArrayQueue::new(capacity.min(SPARE_BUFFERS)));
        let commands = Arc::new(Commands::default());
        let writer = Writer::new(
            receiver,
            Arc::clone(&spare),
            Arc::clone(&commands),
            output,
            dropped.clone(),
        );
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run_until_closed())
            .map_err(|e| format!("access log: cannot start its writer thread: {e}"))?;
        Ok(Arc::new(AccessLog {
            mode: AtomicU8::new(mode(config)),
            lines,
            spare,
            commands,
            dropped,
            running: Mutex::new(config.cloned()),
        }))
    }

    /// Whether requests are logged at all (so the proxy can skip gathering a record).
    pub fn enabled(&self) -> bool {
        self.mode.load(Ordering::Relaxed) != OFF
    }

    /// Formats the request's line and hands it to the writer, never waiting for it.
    pub fn log(&self, record: &Record<'_>) {
        let format = match self.mode.load(Ordering::Relaxed) {
            JSON => LogFormat::Json,
            COMBINED => LogFormat::Combined,
            _ => return,
        };
        let mut line = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(LINE_CAPACITY));
        write_line(&mut line, format, record);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.lines.try_send(Message::Line(line))
        {
            self.dropped.inc();
        }
    }

    /// SIGUSR1: the file is opened again under its path. Says what it reopens, if anything.
    pub fn reopen(&self) -> Option<std::path::PathBuf> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        match running.as_ref().map(|c| &c.target) {
            Some(switchyard_config::LogTarget::File(path)) => {
                let path = path.clone();
                drop(running);
                self.command(Command::Reopen);
                Some(path)
            }
            _ => None,
        }
    }

    /// Waits (at most `timeout`) until every line handed over so far is written: the
    /// process is about to exit.
    pub fn flush(&self, timeout: Duration) {
        let (done, written) = std::sync::mpsc::channel();
        self.command(Command::Flush(done));
        let _ = written.recv_timeout(timeout + writer::POLL);
    }

    /// Checks the settings of a reloaded config: a new path is opened now, so that one that
    /// cannot be written refuses the reload. Nothing changes before [`Prepared::commit`].
    pub fn prepare(
        &self,
        next: Option<&switchyard_config::AccessLog>,
    ) -> Result<Prepared<'_>, String> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let same_target = running.as_ref().map(|c| &c.target) == next.map(|c| &c.target);
        let output = if same_target {
            None
        } else {
            Some(next.map(|c| Output::open(&c.target)).transpose()?)
        };
        Ok(Prepared {
            log: self,
            next: next.cloned(),
            output,
        })
    }

    fn command(&self, command: Command) {
        if let Err(TrySendError::Full(Message::Command(command))) =
            self.lines.try_send(Message::Command(command))
        {
            self.commands.push(command);
        }
    }
}

/// A reload's access-log settings, checked and opened, not yet in use.
pub struct Prepared<'a> {
    log: &'a AccessLog,
    next: Option<switchyard_config::AccessLog>,
    /// `Some` when the target changes: what the writer switches to.
    output: Option<Option<Output>>,
}

impl Prepared<'_> {
    /// Switches to the new settings. A changed `buffer_lines` waits for a restart (the
    /// reload reports it).
    pub fn commit(self) {
        if let Some(output) = self.output {
            self.log.command(Command::Open(output));
        }
        self.log
            .mode
            .store(mode(self.next.as_ref()), Ordering::Relaxed);
        *self
            .log
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = self.next;
    }
}

/// What `check` can tell without opening the file (which would create it): an existing path
/// must be something lines can be appended to and writable; a new one's directory must exist
/// and let us create it. (`access(2)` asks as the process's real user, the one `check` runs as.)
pub fn check(config: &switchyard_config::Config) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let target = &config.access_log.as_ref()?.target;
    let switchyard_config::LogTarget::File(path) = target else {
        return None;
    };
    let problem = |why: String| Some(format!("access_log.path: {}: {why}", path.display()));
    match std::fs::metadata(path) {
        Ok(meta) => {
            let kind = meta.file_type();
            if !(kind.is_file() || kind.is_fifo() || kind.is_char_device()) {
                return problem("is not a file (a directory?)".into());
            }
            writable(path, libc::W_OK).err().and_then(problem)
        }
        Err(_) => {
            let dir = path.parent()?;
            if !dir.is_dir() {
                return problem(format!("directory {} does not exist", dir.display()));
            }
            writable(dir, libc::W_OK | libc::X_OK)
                .err()
                .and_then(|e| problem(format!("cannot create it in {}: {e}", dir.display())))
        }
    }
}

fn writable(path: &std::path::Path, mode: libc::c_int) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated path and a plain mode.
    if unsafe { libc::access(c_path.as_ptr(), mode) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

fn mode(config: Option<&switchyard_config::AccessLog>) -> u8 {
    match config.map(|c| c.format) {
        None => OFF,
        Some(LogFormat::Json) => JSON,
        Some(LogFormat::Combined) => COMBINED,
    }
}

#[cfg(test)]
mod tests;
