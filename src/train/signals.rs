//! Stop requests by signal: SIGTERM (SLURM's preemption/time limit, `scancel`) and SIGUSR1 (SLURM
//! `--signal=USR1@<secs>`) set a process-wide flag; the trainer polls it at step boundaries, writes a
//! checkpoint and returns [`crate::train::trainer::Outcome::Stopped`] (exit status
//! [`crate::train::trainer::EXIT_STOPPED`]).
//!
//! The handler only stores into atomics, which is async-signal-safe.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use crate::error::{Error, Result};

static STOP: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
    STOP.store(true, Ordering::SeqCst);
}

/// Install the SIGTERM and SIGUSR1 handlers (idempotent).
pub fn install() -> Result<()> {
    for sig in [libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: `sigaction` is called with a zero-initialised, then filled `struct sigaction` whose
        // handler is an `extern "C"` function that only performs atomic stores (async-signal-safe).
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(Error::Train(format!(
                "cannot install the handler for signal {sig}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// The signal that requested a stop, if any (0 for [`request_stop`]).
pub fn stop_requested() -> Option<i32> {
    STOP.load(Ordering::SeqCst)
        .then(|| SIGNAL.load(Ordering::SeqCst))
}

/// Ask the trainer to stop at the next step boundary, as a signal would.
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Forget a pending stop request.
pub fn clear() {
    STOP.store(false, Ordering::SeqCst);
    SIGNAL.store(0, Ordering::SeqCst);
}
