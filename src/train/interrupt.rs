//! Ctrl-C and SIGTERM during training: the first finishes the optimizer step in flight, and the
//! loop then saves a checkpoint, says how to resume and exits 130 (SIGINT) or 143 (SIGTERM); a
//! second exits at once, the last complete checkpoint staying valid (checkpoints are written
//! to a `.tmp` folder and renamed, so a kill mid-write leaves none half written).
//!
//! Before the loop is armed (data, weights) there is nothing to save: a signal exits at once.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// The signal asked for, 0 while none.
static REQUESTED: AtomicI32 = AtomicI32::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);

/// While alive, the first SIGINT / SIGTERM is held for the training loop ([`requested`]).
pub struct Armed(());

impl Drop for Armed {
    fn drop(&mut self) {
        ARMED.store(false, Ordering::SeqCst);
    }
}

/// Install the handlers (once per process) and hold signals for the loop until the returned
/// guard drops.
pub fn arm() -> Armed {
    install();
    REQUESTED.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    Armed(())
}

/// The signal received since [`arm`], if any.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

#[cfg(unix)]
fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        extern "C" fn on_signal(sig: libc::c_int) {
            // Only async-signal-safe calls here: atomics, write(2), _exit(2).
            let first = REQUESTED.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst).is_ok();
            if first && ARMED.load(Ordering::SeqCst) {
                let msg = b"\ninterrupted: finishing the current step, then saving a checkpoint (interrupt again to stop now)\n";
                // SAFETY: writing a static buffer to stderr.
                unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
                return;
            }
            // SAFETY: ends the process without running anything else.
            unsafe { libc::_exit(i32::from(crate::error::signal_exit_code(sig))) };
        }
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: `on_signal` is an `extern "C" fn(c_int)` that only makes async-signal-safe
            // calls.
            unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        }
    });
}

#[cfg(not(unix))]
fn install() {}
