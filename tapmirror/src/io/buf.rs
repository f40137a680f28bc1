//! Owned I/O buffers: slots of one registered pool, or plain heap memory for large requests.
//!
//! A buffer is owned by whoever holds the `IoBuf`: while an operation is in flight the io_uring
//! worker holds it, so a dropped future can never free memory the kernel still writes into
//! (the completion-based model of cloud-hypervisor's `AsyncIo` and crosvm's uring executor).
//! Writes take an `Arc<IoBuf>` so one buffer can feed several destinations (the local image and,
//! later, the mirror target) without a copy.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};

/// Size of one registered slot. Guest requests up to this size land in registered memory; larger
/// ones (bulk copies) use heap buffers, where pinning per I/O is amortised over many bytes anyway.
pub const SLOT_SIZE: usize = 256 * 1024;
/// Number of registered slots: 16 MiB pinned in all, enough for 64 requests in flight.
pub const SLOT_COUNT: usize = 64;

/// The process-wide pool of registered slots.
pub struct FixedPool {
    /// Owns the memory `base` points into; never read, only kept alive.
    _map: memmap2::MmapMut,
    base: NonNull<u8>,
    free: Mutex<Vec<u16>>,
}

// SAFETY: the pool hands out disjoint slots; each slot is accessed only through the one `IoBuf`
// that owns its index, and the free list is behind a mutex.
unsafe impl Send for FixedPool {}
// SAFETY: as above; shared access only touches the mutex-protected free list.
unsafe impl Sync for FixedPool {}

impl FixedPool {
    fn new() -> std::io::Result<FixedPool> {
        let mut map = memmap2::MmapMut::map_anon(SLOT_SIZE * SLOT_COUNT)?;
        let base = NonNull::new(map.as_mut_ptr()).ok_or_else(|| std::io::Error::other("null mapping"))?;
        let free = (0..SLOT_COUNT as u16).rev().collect();
        Ok(FixedPool { _map: map, base, free: Mutex::new(free) })
    }

    /// The pool, created on first use; `None` when anonymous memory cannot be mapped.
    pub fn global() -> Option<&'static Arc<FixedPool>> {
        static POOL: OnceLock<Option<Arc<FixedPool>>> = OnceLock::new();
        POOL.get_or_init(|| match FixedPool::new() {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                tracing::warn!(error = %e, "no registered buffer pool; using heap buffers");
                None
            }
        })
        .as_ref()
    }

    /// The iovecs to register with a ring, one per slot, in slot order.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..SLOT_COUNT)
            .map(|i| libc::iovec {
                // SAFETY: i < SLOT_COUNT, so the offset stays inside the mapping.
                iov_base: unsafe { self.base.as_ptr().add(i * SLOT_SIZE) }.cast(),
                iov_len: SLOT_SIZE,
            })
            .collect()
    }

    fn take(&self) -> Option<u16> {
        self.free.lock().ok()?.pop()
    }

    fn give_back(&self, index: u16) {
        if let Ok(mut f) = self.free.lock() {
            f.push(index);
        }
    }

    fn slot_ptr(&self, index: u16) -> *mut u8 {
        debug_assert!(usize::from(index) < SLOT_COUNT);
        // SAFETY: index < SLOT_COUNT (only indices from the free list exist), inside the mapping.
        unsafe { self.base.as_ptr().add(usize::from(index) * SLOT_SIZE) }
    }
}

/// Heap buffers are recycled by power-of-two size class, so bulk I/O that outgrows the registered
/// pool does not pay for fresh pages (and their page faults) on every request.
struct HeapCache {
    classes: Mutex<Vec<Vec<Vec<u8>>>>,
}

/// Most bytes the heap cache keeps idle.
const HEAP_CACHE_BYTES: usize = 64 << 20;
const MIN_CLASS: usize = 4096;
const MAX_CLASS: usize = 32 << 20;

impl HeapCache {
    fn global() -> &'static HeapCache {
        static CACHE: OnceLock<HeapCache> = OnceLock::new();
        CACHE.get_or_init(|| HeapCache { classes: Mutex::new(vec![Vec::new(); 64]) })
    }

    fn class_of(len: usize) -> Option<usize> {
        (len <= MAX_CLASS).then(|| len.max(MIN_CLASS).next_power_of_two())
    }

    /// A vector of exactly the class size for `len`, recycled when one is idle. Recycled
    /// vectors hold old bytes; `fresh` says whether the vector is known to be zeroed.
    fn take(len: usize) -> (Vec<u8>, bool) {
        let Some(class) = Self::class_of(len) else { return (vec![0u8; len], true) };
        let idx = class.trailing_zeros() as usize;
        if let Ok(mut c) = Self::global().classes.lock()
            && let Some(v) = c[idx].pop()
        {
            return (v, false);
        }
        (vec![0u8; class], true)
    }

    fn give(v: Vec<u8>) {
        let len = v.len();
        if !(MIN_CLASS..=MAX_CLASS).contains(&len) || !len.is_power_of_two() {
            return;
        }
        let idx = len.trailing_zeros() as usize;
        if let Ok(mut c) = Self::global().classes.lock() {
            let cached: usize = c.iter().enumerate().map(|(i, l)| l.len() << i).sum();
            if cached + len <= HEAP_CACHE_BYTES {
                c[idx].push(v);
            }
        }
    }
}

enum Storage {
    Heap(Vec<u8>),
    Fixed { pool: Arc<FixedPool>, index: u16 },
}

/// An owned, initialised byte buffer of a fixed length.
pub struct IoBuf {
    storage: Storage,
    len: usize,
}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes, from the registered pool when it fits and a slot is
    /// free, else from the heap.
    pub fn new(len: usize) -> IoBuf {
        if len <= SLOT_SIZE
            && let Some(pool) = FixedPool::global()
            && let Some(index) = pool.take()
        {
            // Slots are reused: clear the part we expose so no stale data can leak into a reply.
            // SAFETY: the slot is exclusively ours; len <= SLOT_SIZE.
            unsafe { std::ptr::write_bytes(pool.slot_ptr(index), 0, len) };
            return IoBuf { storage: Storage::Fixed { pool: Arc::clone(pool), index }, len };
        }
        let (mut v, fresh) = HeapCache::take(len);
        if !fresh {
            v[..len].fill(0);
        }
        IoBuf { storage: Storage::Heap(v), len }
    }

    /// A buffer whose every byte the caller will overwrite before anyone reads it (a write
    /// payload read off the socket, a read filled by the kernel). Skips zeroing a reused slot;
    /// slot memory is always initialised, so at worst stale bytes are visible, never undefined.
    pub fn for_overwrite(len: usize) -> IoBuf {
        if len <= SLOT_SIZE
            && let Some(pool) = FixedPool::global()
            && let Some(index) = pool.take()
        {
            return IoBuf { storage: Storage::Fixed { pool: Arc::clone(pool), index }, len };
        }
        IoBuf { storage: Storage::Heap(HeapCache::take(len).0), len }
    }

    /// A heap buffer holding `data`.
    pub fn from_vec(data: Vec<u8>) -> IoBuf {
        let len = data.len();
        IoBuf { storage: Storage::Heap(data), len }
    }

    /// The registered-buffer index, when this buffer lives in the registered pool.
    pub fn fixed_index(&self) -> Option<u16> {
        match &self.storage {
            Storage::Fixed { index, .. } => Some(*index),
            Storage::Heap(_) => None,
        }
    }

    /// Shortens the visible length (never grows it).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Copies the contents out into a vector.
    pub fn into_vec(mut self) -> Vec<u8> {
        if let Storage::Heap(v) = &mut self.storage {
            let mut v = std::mem::take(v);
            v.truncate(self.len);
            return v;
        }
        self.deref().to_vec()
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.storage {
            Storage::Heap(v) => &v[..self.len],
            // SAFETY: the slot is owned by this buffer for its lifetime and len <= SLOT_SIZE.
            Storage::Fixed { pool, index } => unsafe { std::slice::from_raw_parts(pool.slot_ptr(*index), self.len) },
        }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.storage {
            Storage::Heap(v) => &mut v[..self.len],
            // SAFETY: as in `deref`, and `&mut self` makes this the only access.
            Storage::Fixed { pool, index } => unsafe {
                std::slice::from_raw_parts_mut(pool.slot_ptr(*index), self.len)
            },
        }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match &mut self.storage {
            Storage::Fixed { pool, index } => pool.give_back(*index),
            Storage::Heap(v) => HeapCache::give(std::mem::take(v)),
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).field("fixed", &self.fixed_index()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_buffers_come_from_the_pool_and_return_to_it() {
        let a = IoBuf::new(4096);
        if FixedPool::global().is_some() {
            let idx = a.fixed_index();
            assert!(idx.is_some());
            drop(a);
            // Taking every slot must succeed once the first came back.
            let all: Vec<IoBuf> = (0..SLOT_COUNT).map(|_| IoBuf::new(512)).collect();
            assert!(all.iter().all(|b| b.fixed_index().is_some()) || all.len() < SLOT_COUNT);
        }
        let big = IoBuf::new(SLOT_SIZE + 1);
        assert_eq!(big.fixed_index(), None);
        assert_eq!(big.len(), SLOT_SIZE + 1);
    }

    #[test]
    fn recycled_heap_buffers_are_zeroed_by_new() {
        let mut a = IoBuf::new(SLOT_SIZE * 2);
        assert_eq!(a.fixed_index(), None);
        a.fill(0xcd);
        drop(a);
        let b = IoBuf::new(SLOT_SIZE * 2 - 100);
        assert_eq!(b.len(), SLOT_SIZE * 2 - 100);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn reused_slots_are_zeroed() {
        let mut a = IoBuf::new(1024);
        a.fill(0xab);
        drop(a);
        let b = IoBuf::new(1024);
        assert!(b.iter().all(|&x| x == 0));
    }
}
