//! A one-shot reply slot between a disk's worker thread and its caller, which the caller can
//! either block on or await as a future (the async facade), without any runtime.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

struct State<T> {
    value: Option<T>,
    waker: Option<Waker>,
    closed: bool,
}

struct Slot<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

impl<T> Slot<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The worker's end: send once. Dropping it unsent wakes the caller with `None`.
pub(crate) struct ReplyTx<T>(Arc<Slot<T>>);

/// The caller's end of a request to a disk's worker: [`ReplyRx::wait`] blocks, or `.await` it.
pub struct ReplyRx<T>(Arc<Slot<T>>);

pub(crate) fn reply<T>() -> (ReplyTx<T>, ReplyRx<T>) {
    let slot =
        Arc::new(Slot { state: Mutex::new(State { value: None, waker: None, closed: false }), ready: Condvar::new() });
    (ReplyTx(slot.clone()), ReplyRx(slot))
}

impl<T> ReplyTx<T> {
    pub(crate) fn send(self, value: T) {
        self.0.lock().value = Some(value);
        // Drop wakes the receiver.
    }
}

impl<T> Drop for ReplyTx<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = self.0.lock();
            s.closed = true;
            s.waker.take()
        };
        self.0.ready.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> std::fmt::Debug for ReplyRx<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplyRx")
    }
}

impl<T> ReplyRx<T> {
    /// Blocks until the reply arrives; `None` if the worker went away without answering.
    pub fn wait(self) -> Option<T> {
        let mut s = self.0.lock();
        while s.value.is_none() && !s.closed {
            s = self.0.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.value.take()
    }
}

impl<T> Future for ReplyRx<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = self.0.lock();
        if s.value.is_some() || s.closed {
            return Poll::Ready(s.value.take());
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}
