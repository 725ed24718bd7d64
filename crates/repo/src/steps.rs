//! How far a long repository operation (verify, gc, copy) has come, for whoever shows it: the
//! phase it is in and its steps, updated as it goes and read from another thread; and a way
//! for that thread to stop it (a daemon shutting down).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::RepoError;

/// A phase (`checking chunks`) and its steps done of a total (0 while unknown).
#[derive(Debug, Default)]
pub struct Steps {
    phase: Mutex<String>,
    done: AtomicU64,
    total: AtomicU64,
    stop: AtomicBool,
}

impl Steps {
    /// Starts `phase` of `total` steps (0: not known).
    pub fn phase(&self, phase: &str, total: u64) {
        *self.phase.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = phase.to_owned();
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    /// One step of the phase done; an error once [`Steps::stop`] was called, so that the
    /// operation returns at its next step (each operation stops only where that is safe).
    pub fn step(&self) -> Result<(), RepoError> {
        self.done.fetch_add(1, Ordering::Relaxed);
        match self.stop.load(Ordering::Relaxed) {
            true => Err(RepoError::Stopped(self.snapshot().0)),
            false => Ok(()),
        }
    }

    /// Asks the operation to stop at its next step.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// The phase, the steps done, and the total (0: not known).
    pub fn snapshot(&self) -> (String, u64, u64) {
        let phase = self.phase.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        (phase, self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }
}
