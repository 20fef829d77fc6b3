//! The counting global allocator of the no-allocation tests (`mod` of each such test crate):
//! allocations and reallocations are counted while `COUNTING` is on, on threads that set
//! `HOT_THREAD` only (the harness's and the tests' helper threads allocate as they like).
use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

pub static ALLOCS: AtomicU64 = AtomicU64::new(0);
pub static COUNTING: AtomicBool = AtomicBool::new(false);

thread_local! {
    pub static HOT_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn counted() -> bool {
    COUNTING.load(Ordering::Relaxed) && HOT_THREAD.with(|h| h.get())
}

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if counted() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if counted() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static A: Counting = Counting;
