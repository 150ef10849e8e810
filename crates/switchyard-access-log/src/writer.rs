//! The writer: one thread that takes finished lines off the channel and appends them to the
//! file (or stdout) in batches, and carries out reopen (SIGUSR1), retarget (reload) and
//! flush (exit) commands.
//!
//! A thread of its own rather than a task on one of Pingora's runtimes: a write to a slow
//! disk or a full pipe blocks, and must block nothing but the log. It also outlives the
//! services' shutdown signal, so that requests finished while draining are logged too.
//!
//! The writer polls the channel every [`POLL`] while lines come, instead of sleeping in
//! `recv`: a sender then never has a sleeping receiver to wake, so handing a line over is a
//! couple of atomic operations, not a futex call on the request path. After a second without
//! lines it does sleep in `recv` (an idle process stays idle).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use log::error;
use prometheus::IntCounter;
use switchyard_config::LogTarget;

/// How long lines may wait in the channel while traffic flows.
pub(crate) const POLL: Duration = Duration::from_millis(10);
/// Empty polls before the writer sleeps until the next line.
const IDLE_POLLS: u32 = 100;
/// Lines are written once this much has been gathered, or the channel is empty.
const BATCH_BYTES: usize = 64 * 1024;
/// Line buffers bigger than this are freed rather than reused.
const MAX_SPARE_CAPACITY: usize = 4096;
/// One error line per this interval, however many writes fail (a full disk fails them all).
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

pub(crate) enum Message {
    Line(Vec<u8>),
    /// In the channel, a command takes effect after the lines handed over before it.
    Command(Command),
}

pub(crate) enum Command {
    /// Write from now on here (a reload's new path, or the first one); `None`: stop writing.
    Open(Option<Output>),
    /// Open the file again under its path (logrotate has moved the old one away).
    Reopen,
    /// Everything handed over before this is written: say so.
    Flush(Sender<()>),
}

/// Commands that found the channel full: a reload or a signal must never wait for the log's
/// disk. The writer, busy then, looks at them between batches.
#[derive(Default)]
pub(crate) struct Commands(Mutex<VecDeque<Command>>);

impl Commands {
    pub(crate) fn push(&self, command: Command) {
        self.lock().push_back(command);
    }

    fn take(&self) -> VecDeque<Command> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Command>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where lines go.
pub(crate) enum Output {
    Stdout,
    File { path: PathBuf, file: File },
}

impl Output {
    /// Opens the target for appending (a new file gets mode 0640). In the caller's thread, so
    /// that start and reload can refuse a path that cannot be written.
    pub(crate) fn open(target: &LogTarget) -> Result<Output, String> {
        match target {
            LogTarget::Stdout => Ok(Output::Stdout),
            LogTarget::File(path) => Ok(Output::File {
                path: path.clone(),
                file: open_file(path)?,
            }),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Output::File { file, .. } => file.write_all(bytes),
        }
    }
}

/// Opened without waiting: a pipe nobody reads would otherwise block the open (and with it
/// the reload, or the start) until someone does. Writes then block as usual: a reader that
/// falls behind makes lines drop, not requests wait.
fn open_file(path: &Path) -> Result<File, String> {
    let cannot = |why: String| {
        format!(
            "access_log.path: {}: cannot open for appending: {why}",
            path.display()
        )
    };
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => cannot("it is a pipe that no process reads".into()),
            _ => cannot(e.to_string()),
        })?;
    // SAFETY: fcntl on a descriptor this function owns, with plain integer arguments.
    let blocking = unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !blocking {
        return Err(cannot(std::io::Error::last_os_error().to_string()));
    }
    Ok(file)
}

pub(crate) struct Writer {
    pub(crate) lines: Receiver<Message>,
    /// Written lines' buffers, for the request path to use again.
    pub(crate) spare: Arc<ArrayQueue<Vec<u8>>>,
    pub(crate) commands: Arc<Commands>,
    pub(crate) output: Option<Output>,
    pub(crate) dropped: IntCounter,
    batch: Vec<u8>,
    batch_lines: u64,
    last_error: Option<Instant>,
}

impl Writer {
    pub(crate) fn new(
        lines: Receiver<Message>,
        spare: Arc<ArrayQueue<Vec<u8>>>,
        commands: Arc<Commands>,
        output: Option<Output>,
        dropped: IntCounter,
    ) -> Writer {
        Writer {
            lines,
            spare,
            commands,
            output,
            dropped,
            batch: Vec::with_capacity(BATCH_BYTES + 4096),
            batch_lines: 0,
            last_error: None,
        }
    }

    /// Until every sender is gone (the process's end).
    pub(crate) fn run_until_closed(mut self) {
        let mut idle = 0;
        loop {
            let drained = self.drain();
            // Commands that found the channel full come after the lines that filled it.
            self.run_commands();
            match drained {
                Ok(0) if idle >= IDLE_POLLS => match self.lines.recv() {
                    Ok(message) => {
                        idle = 0;
                        self.take(message);
                    }
                    Err(_) => break,
                },
                Ok(0) => {
                    idle += 1;
                    std::thread::sleep(POLL);
                }
                Ok(_) => {
                    idle = 0;
                    std::thread::sleep(POLL);
                }
                Err(()) => break,
            }
        }
        self.write_batch();
    }

    /// Writes what the channel holds; `Err` once every sender is gone.
    fn drain(&mut self) -> Result<usize, ()> {
        let mut taken = 0;
        loop {
            match self.lines.try_recv() {
                Ok(message) => {
                    taken += 1;
                    self.take(message);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.write_batch();
                    return Err(());
                }
            }
        }
        self.write_batch();
        Ok(taken)
    }

    fn take(&mut self, message: Message) {
        match message {
            Message::Line(mut line) => {
                self.batch.extend_from_slice(&line);
                self.batch_lines += 1;
                // An unusually long line's buffer is not kept for the next.
                if line.capacity() <= MAX_SPARE_CAPACITY {
                    line.clear();
                    let _ = self.spare.push(line);
                }
                if self.batch.len() >= BATCH_BYTES {
                    self.write_batch();
                }
            }
            Message::Command(command) => self.run(command),
        }
    }

    fn write_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let result = match &mut self.output {
            Some(output) => output.write_all(&self.batch),
            // Lines formatted just before the log was switched off.
            None => Ok(()),
        };
        if let Err(e) = result {
            self.dropped.inc_by(self.batch_lines);
            let now = Instant::now();
            if self
                .last_error
                .is_none_or(|at| now.duration_since(at) >= ERROR_LOG_INTERVAL)
            {
                self.last_error = Some(now);
                error!(
                    "access log: cannot write {} lines to {}: {e}; they are dropped and counted in switchyard_access_log_dropped_total (said once a minute)",
                    self.batch_lines,
                    self.describe()
                );
            }
        }
        self.batch.clear();
        self.batch_lines = 0;
    }

    fn describe(&self) -> String {
        match &self.output {
            Some(Output::File { path, .. }) => path.display().to_string(),
            Some(Output::Stdout) => "stdout".into(),
            None => "nowhere".into(),
        }
    }

    fn run_commands(&mut self) {
        for command in self.commands.take() {
            self.run(command);
        }
    }

    fn run(&mut self, command: Command) {
        self.write_batch();
        match command {
            Command::Open(output) => self.output = output,
            Command::Reopen => self.reopen(),
            Command::Flush(done) => {
                let _ = done.send(());
            }
        }
    }

    fn reopen(&mut self) {
        let Some(Output::File { path, file }) = &mut self.output else {
            return;
        };
        match open_file(path) {
            Ok(new) => *file = new,
            Err(e) => error!("access log: SIGUSR1: {e}; still writing to the file open before"),
        }
    }
}
