//! What a full mirror has left to copy, and how copies and guest writes are ordered.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Default granularity: 4 KiB, the smallest that keeps the bitmap of a 2 TiB disk within
/// 64 MiB (2 TiB / 4 KiB = 512 Mi bits). A fine granularity keeps small random guest writes
/// from re-copying large blocks (QEMU's 64 KiB default re-copied 14 GB for 6.7 GB written).
/// Larger disks get a coarser one by default ([`default_granularity`]).
pub const DEFAULT_GRANULARITY: u64 = 4096;

/// The most a bitmap may take by default: 64 MiB, what a 2 TiB disk takes at 4 KiB.
pub const DEFAULT_BITMAP_BYTES: u64 = 64 << 20;

/// The most a bitmap may take at any granularity asked for: 1 GiB, a 2 TiB disk at 512 bytes.
pub const MAX_BITMAP_BYTES: u64 = 1 << 30;

/// The default granularity for a disk of `size` bytes: [`DEFAULT_GRANULARITY`], or for a disk
/// larger than 2 TiB the smallest power of two that keeps its bitmap within
/// [`DEFAULT_BITMAP_BYTES`]. At 4 KiB always, a 1000 TiB qcow2 volume's bitmap was 32 GB, and
/// its allocation aborted the process serving the guest.
pub fn default_granularity(size: u64) -> u64 {
    let bits = DEFAULT_BITMAP_BYTES * 8;
    DEFAULT_GRANULARITY.max(size.div_ceil(bits).next_power_of_two())
}

/// One bit per granule of the disk; set means "the target may not have this yet". Marking and
/// clearing are lock-free (`fetch_or`/`fetch_and`), since guest writes clear bits on the hot path.
pub struct DirtyBitmap {
    words: Vec<AtomicU64>,
    granularity: u64,
    size: u64,
    dirty: AtomicU64,
}

impl DirtyBitmap {
    /// A clean bitmap for `size` bytes at `granularity` (a power of two, at least 512).
    #[cfg(test)]
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        Self::try_new(size, granularity).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A clean bitmap for `size` bytes at `granularity` (a power of two, at least 512), or an
    /// error where its memory cannot be had: a granularity
    /// asked for that is too fine for the disk must fail the attach, not abort the process
    /// that serves the guest.
    pub fn try_new(size: u64, granularity: u64) -> Result<DirtyBitmap, String> {
        let granularity = granularity.max(512).next_power_of_two();
        let bits = size.div_ceil(granularity);
        let n = bits.div_ceil(64);
        if n * 8 > MAX_BITMAP_BYTES {
            return Err(format!(
                "a dirty bitmap of {} MiB ({size} bytes at {granularity} bytes a bit) is more than the {} MiB allowed: ask for a coarser granularity",
                (n * 8) >> 20,
                MAX_BITMAP_BYTES >> 20
            ));
        }
        let n = usize::try_from(n).map_err(|_| format!("a bitmap of {bits} bits does not fit in memory"))?;
        let mut words = Vec::new();
        words
            .try_reserve_exact(n)
            .map_err(|_| format!("no memory for a dirty bitmap of {} MiB ({size} bytes at {granularity} bytes a bit): ask for a coarser granularity", (n * 8) >> 20))?;
        words.extend((0..n).map(|_| AtomicU64::new(0)));
        Ok(DirtyBitmap { words, granularity, size, dirty: AtomicU64::new(0) })
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    fn bits(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    /// Granules dirty now.
    pub fn dirty_granules(&self) -> u64 {
        self.dirty.load(Ordering::Acquire)
    }

    /// Bytes dirty now (the last granule counted whole, except past the end of the disk).
    pub fn dirty_bytes(&self) -> u64 {
        (self.dirty_granules() * self.granularity).min(self.size)
    }

    /// Marks every granule that `[offset, offset + len)` touches.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let first = offset / self.granularity;
        let last = ((offset + len).min(self.size) - 1) / self.granularity;
        let newly = self.each_word(first, last + 1, |word, mask| u64::from(((word.fetch_or(mask, Ordering::AcqRel) & mask) ^ mask).count_ones()));
        self.dirty.fetch_add(newly, Ordering::AcqRel);
    }

    /// Clears the granules lying wholly inside `[offset, offset + len)` (partly covered ones
    /// stay dirty: the rest of them may still differ).
    pub fn clear_covered(&self, offset: u64, len: u64) {
        let end = (offset + len).min(self.size);
        let first = offset.div_ceil(self.granularity);
        // The last granule counts as covered when the range reaches the end of the disk.
        let last_excl = if end == self.size { self.bits() } else { end / self.granularity };
        let cleared = self.each_word(first, last_excl, |word, mask| u64::from((word.fetch_and(!mask, Ordering::AcqRel) & mask).count_ones()));
        self.dirty.fetch_sub(cleared, Ordering::AcqRel);
    }

    /// Whether every granule that `[offset, offset + len)` touches is dirty.
    pub fn all_dirty(&self, offset: u64, len: u64) -> bool {
        if len == 0 || offset >= self.size {
            return false;
        }
        let first = offset / self.granularity;
        let last = ((offset + len).min(self.size) - 1) / self.granularity;
        self.each_word(first, last + 1, |word, mask| u64::from(word.load(Ordering::Acquire) & mask != mask)) == 0
    }

    /// Calls `f` once per word that bits `[first, end)` touch, with the mask of those bits in
    /// it, and sums what it returns. A whole disk is 512 Mi bits at the default granularity
    /// (2 TiB): marking it one bit at a time took seconds, with the guest paused.
    fn each_word(&self, first: u64, end: u64, mut f: impl FnMut(&AtomicU64, u64) -> u64) -> u64 {
        let mut sum = 0;
        let mut bit = first;
        while bit < end {
            let in_word = bit % 64;
            let n = (64 - in_word).min(end - bit);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << in_word };
            sum += f(&self.words[(bit / 64) as usize], mask);
            bit += n;
        }
        sum
    }

    /// The first dirty run at or after `from` (wrapping to the start), at most `max` bytes, as
    /// (offset, length).
    pub fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        if self.dirty_granules() == 0 {
            return None;
        }
        let bits = self.bits();
        let start_bit = (from / self.granularity).min(bits);
        let find = |lo: u64, hi: u64| -> Option<u64> {
            let mut bit = lo;
            while bit < hi {
                let w = self.words[(bit / 64) as usize].load(Ordering::Acquire) >> (bit % 64);
                if w == 0 {
                    bit = (bit / 64 + 1) * 64;
                    continue;
                }
                let b = bit + u64::from(w.trailing_zeros());
                return (b < hi).then_some(b);
            }
            None
        };
        let first = find(start_bit, bits).or_else(|| find(0, start_bit))?;
        let max_bits = (max / self.granularity).max(1);
        let mut n = 1;
        while n < max_bits && first + n < bits {
            let bit = first + n;
            if self.words[(bit / 64) as usize].load(Ordering::Acquire) & (1u64 << (bit % 64)) == 0 {
                break;
            }
            n += 1;
        }
        let offset = first * self.granularity;
        Some((offset, (n * self.granularity).min(self.size - offset)))
    }
}

/// Locks over byte ranges: guest writes share, the background copier excludes. A pending
/// exclusive request holds back new shared ones on its range, so a hot range cannot starve
/// the copier (and so the mirror always converges).
#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Vec<Held>>,
    changed: tokio::sync::Notify,
    next_id: AtomicU64,
}

struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
    granted: bool,
}

/// A held range; released on drop.
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut h) = self.locks.held.lock() {
            h.retain(|x| x.id != self.id);
        }
        self.locks.changed.notify_waiters();
    }
}

impl RangeLocks {
    /// Waits for `[start, end)` in the given mode.
    pub async fn lock(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if exclusive && let Ok(mut h) = self.held.lock() {
            // Register the request at once, so shared requests arriving from now on wait.
            h.push(Held { id, start, end, exclusive, granted: false });
        }
        let guard = RangeGuard { locks: self, id };
        loop {
            let changed = self.changed.notified();
            if let Ok(mut h) = self.held.lock() {
                let blocked = h.iter().any(|x| {
                    x.id != id
                        && x.start < end
                        && start < x.end
                        // Exclusive waits for anything granted and for earlier exclusive requests
                        // (first come, first served); shared waits for any exclusive one.
                        && (exclusive && x.granted || !exclusive && x.exclusive || x.exclusive && x.id < id)
                });
                if !blocked {
                    match h.iter_mut().find(|x| x.id == id) {
                        Some(me) => me.granted = true,
                        None => h.push(Held { id, start, end, exclusive, granted: true }),
                    }
                    return guard;
                }
            }
            changed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_and_clears_granules_and_counts_them() {
        let b = DirtyBitmap::new(1 << 20, 4096);
        b.mark(100, 10);
        b.mark(4000, 200);
        assert_eq!(b.dirty_granules(), 2, "bytes 4000..4200 touch granules 0 and 1");
        assert!(b.all_dirty(0, 8192) && !b.all_dirty(0, 8193), "granule 2 is clean");
        b.clear_covered(0, 4096 + 100);
        assert_eq!(b.dirty_granules(), 1, "granule 1 is only partly covered");
        assert!(!b.all_dirty(4000, 200) && b.all_dirty(4096, 1));
        assert_eq!(b.next_run(0, 1 << 20), Some((4096, 4096)));
        b.mark(0, 1 << 20);
        assert_eq!(b.dirty_bytes(), 1 << 20);
        assert_eq!(b.next_run(8192, 16384), Some((8192, 16384)));
        b.clear_covered(0, 1 << 20);
        assert_eq!(b.next_run(0, 1 << 20), None);
    }

    #[test]
    fn runs_wrap_and_stop_at_clean_granules_and_the_disk_end() {
        let b = DirtyBitmap::new(10_000, 4096);
        b.mark(9000, 1);
        assert_eq!(b.next_run(9000, 1 << 20), Some((8192, 10_000 - 8192)));
        assert_eq!(b.next_run(0, 1 << 20), Some((8192, 1808)), "wraps from the start");
        b.mark(0, 1);
        assert_eq!(b.next_run(0, 1 << 20), Some((0, 4096)), "granule 1 is clean");
        b.clear_covered(8192, 1808);
        assert_eq!(b.dirty_granules(), 1, "the last, short granule clears when covered to the end");
    }

    proptest::proptest! {
        /// Word-at-a-time marking, clearing and testing agree with one bool per granule.
        #[test]
        fn word_operations_match_a_granule_model(
            size in 1u64..300_000,
            ops in proptest::collection::vec((0u8..3, 0u64..320_000, 0u64..70_000), 1..40),
        ) {
            let g = 512;
            let b = DirtyBitmap::new(size, g);
            let granules = size.div_ceil(g) as usize;
            let mut model = vec![false; granules];
            for (op, offset, len) in ops {
                let end = (offset + len).min(size);
                match op {
                    0 => {
                        b.mark(offset, len);
                        if len > 0 && offset < size {
                            for bit in offset / g..=(end - 1) / g {
                                model[bit as usize] = true;
                            }
                        }
                    }
                    1 => {
                        b.clear_covered(offset, len);
                        let last_excl = if end == size { granules as u64 } else { end / g };
                        for bit in offset.div_ceil(g)..last_excl {
                            model[bit as usize] = false;
                        }
                    }
                    _ => {
                        let want = len > 0 && offset < size && (offset / g..=(end - 1) / g).all(|bit| model[bit as usize]);
                        proptest::prop_assert_eq!(b.all_dirty(offset, len), want);
                    }
                }
                proptest::prop_assert_eq!(b.dirty_granules(), model.iter().filter(|&&d| d).count() as u64);
            }
        }
    }

    #[test]
    fn a_2_tib_disk_marks_clears_and_counts_whole() {
        let b = DirtyBitmap::new(2 << 40, DEFAULT_GRANULARITY);
        b.mark(0, 2 << 40);
        assert_eq!(b.dirty_granules(), (2u64 << 40) / DEFAULT_GRANULARITY);
        b.clear_covered(4096, (2 << 40) - 8192);
        assert_eq!(b.dirty_granules(), 2);
        assert!(b.all_dirty(0, 1) && !b.all_dirty(0, 8192) && b.all_dirty((2 << 40) - 1, 1));
    }

    #[test]
    fn default_granularity_keeps_a_2_tib_bitmap_within_64_mib() {
        let bits = (2u64 << 40) / DEFAULT_GRANULARITY;
        assert!(bits / 8 <= 64 << 20);
    }

    /// Up to 2 TiB the default is 4 KiB; beyond, the finest that keeps the bitmap within
    /// 64 MiB, up to the largest disk the protocol can name.
    #[test]
    fn default_granularity_scales_with_the_disk_beyond_2_tib() {
        for size in [0, 1, 1 << 30, 2 << 40] {
            assert_eq!(default_granularity(size), DEFAULT_GRANULARITY, "{size}");
        }
        assert_eq!(default_granularity((2 << 40) + 1), 2 * DEFAULT_GRANULARITY);
        assert_eq!(default_granularity(1000 << 40), 2 << 20);
        for size in [3 << 40, 16 << 40, 1000 << 40, 2 << 50, u64::MAX] {
            let g = default_granularity(size);
            assert!(g.is_power_of_two() && size.div_ceil(g) / 8 <= DEFAULT_BITMAP_BYTES, "{size}: {g}");
            assert!(size.div_ceil(g / 2) / 8 > DEFAULT_BITMAP_BYTES, "{size}: {g} is not the finest");
        }
    }

    /// A bitmap whose memory cannot be had is an error, not an abort.
    #[test]
    fn a_bitmap_too_large_for_memory_is_an_error() {
        let e = DirtyBitmap::try_new(u64::MAX, 512).err().expect("refused");
        assert!(e.contains("granularity"), "{e}");
    }

    #[tokio::test]
    async fn exclusive_waits_for_shared_and_holds_back_new_shared() {
        let locks = std::sync::Arc::new(RangeLocks::default());
        let shared = locks.lock(0, 100, false).await;
        let l2 = std::sync::Arc::clone(&locks);
        let copier = tokio::spawn(async move {
            let _g = l2.lock(50, 150, true).await;
        });
        tokio::task::yield_now().await;
        assert!(!copier.is_finished(), "exclusive must wait for the shared holder");
        // A new shared request on the range waits behind the pending exclusive one...
        let l3 = std::sync::Arc::clone(&locks);
        let late = tokio::spawn(async move {
            let _g = l3.lock(60, 70, false).await;
        });
        // ...while a disjoint one does not.
        let _other = locks.lock(500, 600, false).await;
        tokio::task::yield_now().await;
        assert!(!late.is_finished());
        drop(shared);
        copier.await.expect("copier");
        late.await.expect("late shared");
    }
}
