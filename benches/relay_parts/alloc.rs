//! The bench process's allocator, switchable between mimalloc (what the shipped binary uses)
//! and glibc's malloc while the bench runs, so the two are compared in one process on the same
//! outbox. Each block goes back to the allocator that owns it (`mi_is_in_heap_region`), so
//! switching mid-run is sound; both settings pay that check on every free, so the measured
//! difference is, if anything, smaller than between the two allocators alone.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

use mimalloc::MiMalloc;

static USE_SYSTEM: AtomicBool = AtomicBool::new(false);

/// Routes new allocations to glibc's malloc (`true`) or mimalloc (`false`, the default).
pub fn use_system_malloc(system: bool) {
    USE_SYSTEM.store(system, Ordering::SeqCst);
}

pub struct Switchable;

fn owned_by_mimalloc(ptr: *mut u8) -> bool {
    // SAFETY: only reads mimalloc's segment map; any pointer value may be asked about.
    unsafe { libmimalloc_sys::mi_is_in_heap_region(ptr.cast()) }
}

// SAFETY: every method forwards to a sound allocator, and a block is always freed or resized by
// the allocator that handed it out.
unsafe impl GlobalAlloc for Switchable {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if USE_SYSTEM.load(Ordering::Relaxed) {
            unsafe { System.alloc(layout) }
        } else {
            unsafe { MiMalloc.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if USE_SYSTEM.load(Ordering::Relaxed) {
            unsafe { System.alloc_zeroed(layout) }
        } else {
            unsafe { MiMalloc.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if owned_by_mimalloc(ptr) {
            unsafe { MiMalloc.dealloc(ptr, layout) }
        } else {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if owned_by_mimalloc(ptr) {
            unsafe { MiMalloc.realloc(ptr, layout, new_size) }
        } else {
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}
