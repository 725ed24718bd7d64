//! Shared pieces of the fake-VDDK tests: disk images with known data and a tiny executor.
#![allow(
    clippy::cast_possible_truncation,
    dead_code,
    reason = "test sizes are small; each test binary uses part of this"
)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// Writes an image of `size` bytes with pseudo-random data at `runs` (byte offset, length),
/// holes elsewhere; returns its contents.
pub(crate) fn image(path: &Path, size: u64, runs: &[(u64, u64)]) -> Vec<u8> {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut contents = vec![0u8; size as usize];
    let mut state = 0x1234_5678_9abc_def1u64;
    for &(at, len) in runs {
        for b in &mut contents[at as usize..(at + len) as usize] {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state.to_le_bytes()[0] | 1;
        }
        f.write_all_at(&contents[at as usize..(at + len) as usize], at).unwrap();
    }
    f.sync_all().unwrap();
    contents
}

struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to completion on this thread.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}
