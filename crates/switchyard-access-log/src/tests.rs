//! The writer thread with real files and a real pipe: what arrives, reopen, reload, drops.

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use switchyard_config::{LogFormat, LogTarget};
use switchyard_pool::Metrics;

use crate::{AccessLog, Record};

/// A directory of its own under the system's temp dir, removed at the end of the test.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "switchyard-access-log-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn settings(
    target: LogTarget,
    format: LogFormat,
    buffer_lines: usize,
) -> switchyard_config::AccessLog {
    switchyard_config::AccessLog {
        target,
        format,
        buffer_lines,
    }
}

fn record(path: &str) -> Record<'_> {
    Record {
        time: UNIX_EPOCH + Duration::from_secs(1_796_119_200),
        client: None,
        method: Some("GET"),
        host: None,
        path: Some(path),
        query: None,
        protocol: Some("HTTP/1.1"),
        status: 200,
        bytes_sent: 2,
        duration: Duration::from_millis(1),
        route: None,
        upstream: None,
        backend: None,
        request_id: b"id",
        retries: 0,
        user_agent: None,
        referer: None,
        tls: None,
        error: None,
    }
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn start(config: Option<&switchyard_config::AccessLog>) -> (Arc<AccessLog>, Metrics) {
    let metrics = Metrics::new();
    let log = AccessLog::start(config, &metrics).expect("starts");
    (log, metrics)
}

#[test]
fn lines_arrive_in_order_and_a_flush_waits_for_them() {
    let dir = Dir::new("order");
    let file = dir.path("access.log");
    let (log, _metrics) = start(Some(&settings(
        LogTarget::File(file.clone()),
        LogFormat::Json,
        1024,
    )));
    let paths: Vec<String> = (0..500).map(|i| format!("/{i}")).collect();
    for path in &paths {
        log.log(&record(path));
    }
    log.flush(Duration::from_secs(5));
    let written = lines(&file);
    assert_eq!(written.len(), 500);
    for (line, path) in written.iter().zip(&paths) {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        assert_eq!(v["path"], path.as_str());
    }
    assert_eq!(log.dropped.get(), 0);
}

#[test]
fn sigusr1_reopens_the_file_after_logrotate_moved_it() {
    let dir = Dir::new("reopen");
    let file = dir.path("access.log");
    let (log, _metrics) = start(Some(&settings(
        LogTarget::File(file.clone()),
        LogFormat::Combined,
        1024,
    )));
    log.log(&record("/before"));
    log.flush(Duration::from_secs(5));
    let rotated = dir.path("access.log.1");
    std::fs::rename(&file, &rotated).unwrap();
    // Until the reopen, lines follow the moved file.
    log.log(&record("/moved"));
    log.reopen();
    log.log(&record("/after"));
    log.flush(Duration::from_secs(5));
    let old = lines(&rotated);
    assert_eq!(old.len(), 2, "{old:?}");
    assert!(old[0].contains("GET /before HTTP/1.1"), "{old:?}");
    let new = lines(&file);
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(new[0].contains("GET /after HTTP/1.1"), "{new:?}");
}

#[test]
fn a_reload_switches_path_and_format_and_a_bad_path_changes_nothing() {
    let dir = Dir::new("reload");
    let first = dir.path("a.log");
    let (log, _metrics) = start(Some(&settings(
        LogTarget::File(first.clone()),
        LogFormat::Json,
        1024,
    )));
    let bad = settings(
        LogTarget::File(dir.path("missing-dir/b.log")),
        LogFormat::Combined,
        1024,
    );
    let e = log.prepare(Some(&bad)).err().expect("refused");
    assert!(e.starts_with("access_log.path: "), "{e}");
    assert!(
        e.contains("missing-dir/b.log: cannot open for appending"),
        "{e}"
    );
    log.log(&record("/one"));
    let second = dir.path("b.log");
    let next = settings(LogTarget::File(second.clone()), LogFormat::Combined, 1024);
    log.prepare(Some(&next)).expect("opens").commit();
    log.log(&record("/two"));
    log.flush(Duration::from_secs(5));
    assert_eq!(lines(&first).len(), 1);
    assert!(lines(&first)[0].starts_with('{'));
    assert_eq!(lines(&second).len(), 1);
    assert!(
        lines(&second)[0].starts_with("- - - ["),
        "{:?}",
        lines(&second)
    );
    // Switched off: nothing more is written anywhere.
    log.prepare(None).expect("off").commit();
    assert!(!log.enabled());
    log.log(&record("/three"));
    log.flush(Duration::from_secs(5));
    assert_eq!(lines(&second).len(), 1);
}

#[test]
fn without_an_access_log_nothing_is_formatted_and_one_can_be_added() {
    let dir = Dir::new("add");
    let (log, _metrics) = start(None);
    assert!(!log.enabled());
    log.log(&record("/ignored"));
    let file = dir.path("later.log");
    let next = settings(LogTarget::File(file.clone()), LogFormat::Json, 1024);
    log.prepare(Some(&next)).expect("opens").commit();
    log.log(&record("/kept"));
    log.flush(Duration::from_secs(5));
    let written = lines(&file);
    assert_eq!(written.len(), 1);
    assert!(written[0].contains("\"path\":\"/kept\""));
}

/// A pipe nobody reads: the writer blocks on it, the channel fills, and from then on each
/// line is dropped and counted, at once.
#[test]
fn a_blocked_writer_drops_and_counts_lines_without_blocking_the_caller() {
    let dir = Dir::new("blocked");
    let fifo = dir.path("fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // A reader that never reads: opening for writing then does not block.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let (log, _metrics) = start(Some(&settings(
        LogTarget::File(fifo.clone()),
        LogFormat::Json,
        8,
    )));
    let long_path = "/".repeat(2000);
    let started = Instant::now();
    // 64 KiB of pipe, 8 lines of channel: far fewer than this many lines fit.
    for _ in 0..2000 {
        log.log(&record(&long_path));
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let dropped = log.dropped.get();
    assert!(dropped > 1000, "{dropped} dropped");
}
