//! How far a long repository operation (verify, gc, copy) has come, for whoever shows it: the
//! phase it is in and its steps, updated as it goes and read from another thread.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A phase (`checking chunks`) and its steps done of a total (0 while unknown).
#[derive(Debug, Default)]
pub struct Steps {
    phase: Mutex<String>,
    done: AtomicU64,
    total: AtomicU64,
}

impl Steps {
    /// Starts `phase` of `total` steps (0: not known).
    pub fn phase(&self, phase: &str, total: u64) {
        *self.phase.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = phase.to_owned();
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    /// One step of the phase done.
    pub fn step(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// The phase, the steps done, and the total (0: not known).
    pub fn snapshot(&self) -> (String, u64, u64) {
        let phase = self.phase.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        (phase, self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }
}
