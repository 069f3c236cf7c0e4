//! The binary's allocator: mimalloc, which keeps freed memory for reuse instead of handing
//! large tensors back to the OS and paying for fresh zeroed pages on every op.
//!
//! Keeping freed memory is right while a model runs and wrong while it loads: the
//! tokenizer's parse and the checkpoint's staging copies are freed early, but mimalloc would
//! hold their pages (for a second, its purge delay) next to the weights that follow,
//! and the process would peak at weights plus garbage. So a load runs with purging at once
//! and lazy arena commits, and the purge delay comes back when the weights are in place (the
//! lazy commits stay: they cost decoding nothing measurable).

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` (same number in mimalloc 2 and 3's `mi_option_e`).
const ARENA_EAGER_COMMIT: mi_option_t = 4;
/// `mi_option_purge_delay`, in milliseconds (same number in mimalloc 2 and 3).
const PURGE_DELAY: mi_option_t = 15;

/// The purge delay in force before [`loading`] (mimalloc's default, or the environment's),
/// which [`running`] restores once.
static SAVED_PURGE_DELAY: AtomicI64 = AtomicI64::new(0);
static SAVED: AtomicBool = AtomicBool::new(false);

/// Hands freed memory back to the OS at once, for the start-up that loads a model. Runs
/// before anything allocates (an ELF constructor of priority 100, ahead of mimalloc's own at
/// 101 or unprioritised): the first arena is reserved by the first allocation, and an arena
/// commits its memory as it is made. The options read the environment on first use, which
/// works this early, and are kept when mimalloc initialises.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
extern "C" fn loading() {
    // SAFETY: mimalloc's options are plain integers, set before any thread exists.
    unsafe {
        // `c_long` is 32 bits on some targets.
        #[allow(clippy::useless_conversion)]
        let delay = i64::from(mi_option_get(PURGE_DELAY));
        SAVED_PURGE_DELAY.store(delay, Ordering::Relaxed);
        SAVED.store(true, Ordering::Release);
        mi_option_set(ARENA_EAGER_COMMIT, 0);
        mi_option_set(PURGE_DELAY, 0);
    }
}

#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array.00100")]
static LOADING: extern "C" fn() = loading;

/// Back to keeping freed memory a while, once a model's weights are in place.
pub fn running() {
    if SAVED.swap(false, Ordering::Acquire) {
        let delay = SAVED_PURGE_DELAY.load(Ordering::Relaxed);
        // SAFETY: an option is a plain integer that mimalloc's threads read without locks, by
        // design; the other threads see the new delay at their next purge.
        unsafe { mi_option_set(PURGE_DELAY, delay as _) };
    }
}
