//! The process's heap allocator: mimalloc, which costs a fraction of glibc's malloc on the
//! request path (see docs/benchmarks.md). With the `alloc-count` feature (bench builds only)
//! every allocation is also counted, and the total is printed when the process exits, so that
//! the benchmark can work out allocations per proxied request.

#[cfg(not(feature = "alloc-count"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "alloc-count")]
pub use counting::report;

/// Nothing to report without the `alloc-count` feature.
#[cfg(not(feature = "alloc-count"))]
pub fn report() {}

#[cfg(feature = "alloc-count")]
mod counting {
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::{AtomicU64, Ordering};

    use mimalloc::MiMalloc;

    struct Counting;

    static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    // SAFETY: every call is forwarded unchanged to mimalloc; only a counter is added.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            unsafe { MiMalloc.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            unsafe { MiMalloc.alloc_zeroed(layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            unsafe { MiMalloc.realloc(ptr, layout, new_size) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { MiMalloc.dealloc(ptr, layout) }
        }
    }

    /// Prints the number of allocations (and reallocations) made since the process started.
    pub fn report() {
        eprintln!("allocations: {}", ALLOCATIONS.load(Ordering::Relaxed));
    }
}
