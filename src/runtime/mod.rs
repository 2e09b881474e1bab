//! Our own Llama-3.x forward pass on candle: every position's logits, a KV cache for generation,
//! and hooks through which calibration observes each linear layer's input.
pub mod block;
pub mod cpu;
pub mod devform;
pub mod device;
pub mod gemm;
pub mod gemm_i8;
pub mod linear;
pub mod llama;
pub mod load;
pub mod spill;

pub use block::Block;
pub use device::pick_device;
pub use linear::Linear;
pub use llama::{observe_streamed, KvCache, Llama, LoadOptions, Observer, Packing, Streamed};
pub use load::Source;

/// Keeps freed buffers in the process heap instead of returning them to the system after every
/// block: the runner allocates and frees the same few hundred-megabyte activations once per
/// layer, and glibc's defaults would map, zero-fill and unmap each of them every time.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator thresholds; called before heavy use.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        });
    }
}

/// Returns the heap's free memory to the system: after a phase that kept large buffers in the
/// heap (see [`tune_allocator`]), the next phase's peak should not sit on top of them.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds unused.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Physical memory of this machine in bytes (`u64::MAX` where it cannot be read).
pub fn physical_memory() -> u64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads system constants.
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages > 0 && size > 0 {
            return pages as u64 * size as u64;
        }
    }
    u64::MAX
}
