//! The allocator tunable the daemon sets at start ([`nbds3::memory::pin_mmap_threshold`]),
//! in its own test binary: it changes process-wide allocator state, and the check reads
//! process-wide counters that other tests' threads would disturb.

/// After a large mapped buffer is freed, glibc raises its mmap threshold to that size, and
/// a later 1–6 MiB buffer comes from an arena (where its pages stay resident after the
/// free, between smaller chunks). Pinned, such a buffer is still mapped on its own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn pinned_threshold_keeps_large_buffers_mapped() {
    fn mapped_bytes() -> usize {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        unsafe { libc::mallinfo2() }.hblkhd
    }
    // `len` more than the arena has free (the threshold only applies when the arena must
    // grow): each call uses a larger size than the buffers freed before it.
    fn big_alloc_is_mapped(len: usize) -> bool {
        // Free an 8 MiB mapped buffer: unpinned, this raises the threshold to 8 MiB.
        drop(std::hint::black_box(vec![1u8; 8 << 20]));
        let before = mapped_bytes();
        let b = std::hint::black_box(vec![1u8; len]);
        let mapped = mapped_bytes() >= before + len;
        drop(b);
        mapped
    }
    assert!(
        !big_alloc_is_mapped(1 << 20),
        "glibc's dynamic threshold should have put the 1 MiB buffer in an arena"
    );
    assert!(nbds3::memory::pin_mmap_threshold(
        nbds3::memory::MMAP_THRESHOLD_BYTES
    ));
    assert!(
        big_alloc_is_mapped(6 << 20),
        "the pinned threshold was not applied"
    );
}
