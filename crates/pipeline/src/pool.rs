//! One bounded pool of I/O buffers per process, so a memory cap holds however many disks copy
//! at once: requests shrink under pressure, and waiting leases are served in turn (first come,
//! first served), so no disk starves.
//!
//! Buffers go back to the pool, not to the allocator: freeing and reallocating megabytes from
//! many threads let glibc's per-thread arenas keep 30 % more than the cap resident (measured
//! with 100 disks), so a returned buffer is handed to the next lease, whatever its size, and
//! memory is only freed when a lease needs more than the cached buffers can give.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The accounting unit: memory is reserved in multiples of it.
pub const UNIT: u64 = 64 << 10;

/// Every buffer starts on this boundary, so a sink may hand it to `O_DIRECT` as it is.
pub const ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes starting on an [`ALIGN`] boundary (found inside a slightly
/// larger allocation, which needs no `unsafe`).
pub fn aligned(len: usize) -> BytesMut {
    use bytes::Buf;
    let mut b = BytesMut::zeroed(len + ALIGN);
    let skip = b.as_ptr().align_offset(ALIGN).min(ALIGN);
    b.advance(skip);
    b.truncate(len);
    b
}

/// The most buffers kept for reuse when idle (reuse spares the page faults of fresh memory).
const MAX_CACHED: usize = 256;

/// A process-wide pool of buffers under a memory cap.
#[derive(Debug)]
pub struct BufferPool {
    sem: Arc<Semaphore>,
    cap_units: u32,
    cached: Mutex<Vec<(BytesMut, OwnedSemaphorePermit)>>,
    peak_units: AtomicU64,
    /// Buffers allocated (not taken from the cache) since the pool was made.
    allocated: AtomicU64,
    /// Signalled whenever a buffer or its memory comes back; waiting leases queue on it.
    returned: Notify,
}

/// A buffer on loan from the pool, with the memory it is charged for. Hand the buffer back
/// with [`Lease::put`] so it can be reused; dropping the lease frees its share of the cap.
#[derive(Debug)]
pub struct Lease {
    buf: Option<BytesMut>,
    permit: Option<OwnedSemaphorePermit>,
    pool: Arc<BufferPool>,
}

impl Lease {
    /// The buffer, sized to the request, to move into a read.
    pub fn take(&mut self) -> BytesMut {
        self.buf.take().unwrap_or_default()
    }

    /// Gives the buffer back after the request. A buffer larger than what was charged for it
    /// is not kept (the cap would not cover it).
    pub fn put(&mut self, buf: BytesMut) {
        self.buf = Some(buf);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else { return };
        if let Some(buf) = self.buf.take()
            && buf.capacity() as u64 <= u64::try_from(permit.num_permits()).unwrap_or(0) * UNIT
        {
            let mut cached = self.pool.cached.lock().unwrap_or_else(|p| p.into_inner());
            if cached.len() < MAX_CACHED {
                cached.push((buf, permit));
            }
        }
        // Either way something came back (a buffer, or its memory): the next waiter may go.
        self.pool.returned.notify_one();
    }
}

/// What a buffer of `bytes` is charged, its alignment slack included.
fn units(bytes: u64) -> u32 {
    u32::try_from((bytes + ALIGN as u64).div_ceil(UNIT).max(1)).unwrap_or(u32::MAX)
}

impl BufferPool {
    /// A pool that never holds more than `cap` bytes of buffers (at least one unit).
    pub fn new(cap: u64) -> Arc<Self> {
        let cap_units = u32::try_from((cap / UNIT).max(1))
            .unwrap_or(u32::MAX)
            .min(u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX));
        Arc::new(Self {
            sem: Arc::new(Semaphore::new(cap_units as usize)),
            cap_units,
            cached: Mutex::new(Vec::new()),
            peak_units: AtomicU64::new(0),
            allocated: AtomicU64::new(0),
            returned: Notify::new(),
        })
    }

    /// The cap in bytes.
    pub fn cap(&self) -> u64 {
        u64::from(self.cap_units) * UNIT
    }

    /// The most memory ever charged at once (buffers in use and cached), in bytes.
    pub fn peak(&self) -> u64 {
        self.peak_units.load(Ordering::Relaxed) * UNIT
    }

    /// How many buffers were allocated rather than reused: each is memory touched afresh,
    /// which on a virtual machine can cost more than the copy through it.
    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    fn note_peak(&self) {
        let used = u64::from(self.cap_units).saturating_sub(self.sem.available_permits() as u64);
        self.peak_units.fetch_max(used, Ordering::Relaxed);
    }

    /// A buffer of `want` bytes, or less (halving, not below `min`) when memory is short;
    /// waits only when not even `min` bytes are at hand. Both are clamped to the cap.
    pub async fn lease(self: &Arc<Self>, want: u64, min: u64) -> Lease {
        let want = want.clamp(1, self.cap());
        let min = min.clamp(1, want);
        loop {
            // Register for a wake-up before looking, so a return in between is not missed.
            let returned = self.returned.notified();
            let mut returned = std::pin::pin!(returned);
            returned.as_mut().enable();
            if let Some(lease) = self.try_lease(want, min).or_else(|| self.any_cached(want, min)) {
                return lease;
            }
            // What is cached is too small for even `min`: free it, so its memory can be had.
            let freed = {
                let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
                let n = cached.len();
                cached.clear();
                n > 0
            };
            if freed {
                continue;
            }
            returned.await;
        }
    }

    /// Any cached buffer of at least `min` bytes, used for up to `want` bytes.
    fn any_cached(self: &Arc<Self>, want: u64, min: u64) -> Option<Lease> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        // The smallest that holds `want`, else the largest there is.
        let fits = |b: &BytesMut| b.capacity() as u64 >= min;
        let at = cached
            .iter()
            .enumerate()
            .filter(|(_, (b, _))| fits(b) && b.capacity() as u64 >= want)
            .min_by_key(|(_, (b, _))| b.capacity())
            .or_else(|| cached.iter().enumerate().filter(|(_, (b, _))| fits(b)).max_by_key(|(_, (b, _))| b.capacity()))
            .map(|(i, _)| i)?;
        let (mut buf, permit) = cached.swap_remove(at);
        drop(cached);
        let size = to_usize(want.min(buf.capacity() as u64));
        if buf.len() >= size {
            buf.truncate(size);
        } else {
            buf.resize(size, 0);
        }
        Some(Lease { buf: Some(buf), permit: Some(permit), pool: self.clone() })
    }

    fn try_lease(self: &Arc<Self>, want: u64, min: u64) -> Option<Lease> {
        let mut size = want;
        loop {
            if let Some(lease) = self.from_cache(size) {
                return Some(lease);
            }
            if let Ok(permit) = self.sem.clone().try_acquire_many_owned(units(size)) {
                self.note_peak();
                self.allocated.fetch_add(1, Ordering::Relaxed);
                return Some(Lease { buf: Some(aligned(to_usize(size))), permit: Some(permit), pool: self.clone() });
            }
            if size <= min {
                return None;
            }
            size = (size / 2).max(min);
        }
    }

    fn from_cache(self: &Arc<Self>, size: u64) -> Option<Lease> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        // A cached buffer fits if it is big enough and not more than twice the size.
        let at = cached.iter().position(|(b, _)| {
            let cap = b.capacity() as u64;
            cap >= size && cap <= size.saturating_mul(2)
        })?;
        let (mut buf, permit) = cached.swap_remove(at);
        drop(cached);
        let size = to_usize(size);
        if buf.len() >= size {
            buf.truncate(size);
        } else {
            buf.resize(size, 0);
        }
        Some(Lease { buf: Some(buf), permit: Some(permit), pool: self.clone() })
    }
}

/// Request sizes are bounded by the cap, which fits in memory, so this never saturates on the
/// 64-bit targets the workspace builds for.
fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_shrink_under_pressure_and_the_cap_holds() {
        let pool = BufferPool::new(1 << 20);
        let mut a = pool.lease(768 << 10, 64 << 10).await;
        assert_eq!(a.take().len(), 768 << 10);
        // 13 of the 16 units are taken (768 KiB and its alignment slack): the next request is
        // halved until it fits (96 KiB, slack charged), not refused and not over the cap.
        let mut b = pool.lease(768 << 10, 64 << 10).await;
        assert_eq!(b.take().len(), 96 << 10);
        assert!(pool.peak() <= 1 << 20);
        // With nothing left, a third lease waits until one comes back.
        let p2 = pool.clone();
        let waiter = tokio::spawn(async move { p2.lease(128 << 10, 64 << 10).await.take().len() });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        // The first lease's memory comes back: the waiter gets all it asked for.
        drop(a);
        assert_eq!(waiter.await.unwrap(), 128 << 10);
        assert!(pool.peak() <= 1 << 20);
    }

    #[tokio::test]
    async fn a_waiting_lease_takes_a_returned_buffer_of_another_size() {
        let pool = BufferPool::new(4 << 20);
        let mut a = pool.lease(3 << 20, 1 << 20).await;
        let buf = a.take();
        let ptr = buf.as_ptr();
        let p2 = pool.clone();
        // Wants 2 MiB; only about 1 MiB is free and the minimum is 2 MiB: it waits.
        let waiter = tokio::spawn(async move {
            let mut l = p2.lease(2 << 20, 2 << 20).await;
            let b = l.take();
            (b.as_ptr() as usize, b.len())
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        a.put(buf);
        drop(a);
        // It got the 3 MiB buffer back, cut to 2 MiB, rather than fresh memory.
        assert_eq!(waiter.await.unwrap(), (ptr as usize, 2 << 20));
    }

    #[tokio::test]
    async fn buffers_are_reused() {
        let pool = BufferPool::new(4 << 20);
        let mut a = pool.lease(1 << 20, 1 << 20).await;
        let mut buf = a.take();
        buf[0] = 7;
        let ptr = buf.as_ptr();
        a.put(buf);
        drop(a);
        let mut b = pool.lease(1 << 20, 1 << 20).await;
        let again = b.take();
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.as_ptr().align_offset(ALIGN), 0);
    }
}
