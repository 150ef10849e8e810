//! The process's heap allocator: mimalloc, which costs a fraction of glibc's malloc on the
//! request path (see docs/benchmarks.md). With the `alloc-count` feature (bench builds only)
//! every allocation is also counted, and the total is printed when the process exits, so that
//! the benchmark can work out allocations per proxied request. The same build also keeps a
//! histogram of live allocations by size: with `SWITCHYARD_ALLOC_LIVE=<file>` in the
//! environment it is written to that file once a second, so that the memory an idle
//! connection holds can be read as the difference between two snapshots.

#[cfg(not(feature = "alloc-count"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "alloc-count")]
pub use counting::{report, start_live_report};

/// Nothing to report without the `alloc-count` feature.
#[cfg(not(feature = "alloc-count"))]
pub fn report() {}

/// No histogram without the `alloc-count` feature.
#[cfg(not(feature = "alloc-count"))]
pub fn start_live_report() {}

#[cfg(feature = "alloc-count")]
mod counting {
    use std::alloc::{GlobalAlloc, Layout};
    use std::io::Write;
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
    use std::time::Duration;

    use mimalloc::MiMalloc;

    struct Counting;

    static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

    /// Live allocations by size in 16-byte steps up to 64 KiB; the last slot counts the
    /// larger ones, whose bytes go to `LARGE_BYTES`.
    const SLOTS: usize = 64 * 1024 / 16 + 1;
    static LIVE: [AtomicI64; SLOTS] = [const { AtomicI64::new(0) }; SLOTS];
    static LARGE_BYTES: AtomicI64 = AtomicI64::new(0);

    fn slot(size: usize) -> usize {
        size.div_ceil(16).min(SLOTS - 1)
    }

    fn live(size: usize, change: i64) {
        let at = slot(size);
        LIVE[at].fetch_add(change, Ordering::Relaxed);
        if at == SLOTS - 1 {
            LARGE_BYTES.fetch_add(change * size as i64, Ordering::Relaxed);
        }
    }

    /// With `SWITCHYARD_ALLOC_LIVE` set, a thread rewrites the histogram of live allocations
    /// to that file once a second: `<size rounded up to 16> <count>` lines, then the total.
    pub fn start_live_report() {
        let Some(path) = std::env::var_os("SWITCHYARD_ALLOC_LIVE") else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("alloc live".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                let mut text = Vec::new();
                let mut total = LARGE_BYTES.load(Ordering::Relaxed);
                for (at, count) in LIVE.iter().enumerate() {
                    let count = count.load(Ordering::Relaxed);
                    if count != 0 && at < SLOTS - 1 {
                        total += count * (at as i64 * 16);
                    }
                    if count != 0 {
                        let _ = writeln!(text, "{} {count}", at * 16);
                    }
                }
                let _ = writeln!(text, "total {total}");
                let _ = std::fs::write(&path, text);
            });
        if let Err(e) = spawned {
            eprintln!("alloc live report: {e}");
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    // SAFETY: every call is forwarded unchanged to mimalloc; only a counter is added.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            live(layout.size(), 1);
            unsafe { MiMalloc.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            live(layout.size(), 1);
            unsafe { MiMalloc.alloc_zeroed(layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            live(layout.size(), -1);
            live(new_size, 1);
            unsafe { MiMalloc.realloc(ptr, layout, new_size) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            live(layout.size(), -1);
            unsafe { MiMalloc.dealloc(ptr, layout) }
        }
    }

    /// Prints the number of allocations (and reallocations) made since the process started.
    pub fn report() {
        eprintln!("allocations: {}", ALLOCATIONS.load(Ordering::Relaxed));
    }
}
