//! `residue`: looks for anything an earlier run left in its memory, then
//! leaves some of its own. The host reuses a finished run's memory slot for
//! the next run (resetting only the pages it wrote), so every run must still
//! start from the component's pristine image: initialised data as compiled,
//! zeroed statics, and fresh heap pages that read as zero.
//! Payload: how many MiB of fresh heap to check and fill (a JSON number).
//! Output: `{"data": MARK as found, "bss_dirty": n, "heap_dirty": n}`.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use core::ptr::{addr_of, addr_of_mut};
use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};

/// Initialised data: a fresh instance finds this value.
static mut MARK: u64 = 0x5EED;
/// Zero-initialised (bss: no data segment restores it, only fresh memory).
static mut SCRATCH: [u8; 256 << 10] = [0; 256 << 10];

struct Residue;

/// Counts the bytes of `len` at `ptr` that are not zero, then fills them.
///
/// # Safety
/// `ptr` must be valid for reads and writes of `len` bytes.
unsafe fn count_dirty_then_fill(ptr: *mut u8, len: usize) -> usize {
    let mut dirty = 0;
    for i in 0..len {
        // SAFETY: within the block, as the caller promised.
        unsafe {
            if core::ptr::read_volatile(ptr.add(i)) != 0 {
                dirty += 1;
            }
            core::ptr::write_volatile(ptr.add(i), 0xA5);
        }
    }
    dirty
}

impl Guest for Residue {
    fn run(task: Task) -> Result<Outcome, Failure> {
        let Ok(heap_mib) = task.payload.trim().parse::<usize>() else {
            return Err(Failure::Permanent(
                "the payload must be a number of MiB".into(),
            ));
        };
        // SAFETY: one run at a time per instance; nothing else holds these.
        let data = unsafe {
            let found = core::ptr::read_volatile(addr_of!(MARK));
            core::ptr::write_volatile(addr_of_mut!(MARK), 0xBAD);
            found
        };
        // SAFETY: SCRATCH is a static of exactly this size.
        let bss_dirty = unsafe { count_dirty_then_fill(addr_of_mut!(SCRATCH).cast(), 256 << 10) };
        // A block this big comes straight from `memory.grow`, which the
        // allocator trusts to be zero, so `alloc_zeroed` does not clear it.
        let heap_block = heap_mib.max(1) << 20;
        let layout = std::alloc::Layout::from_size_align(heap_block, 16).unwrap();
        // SAFETY: a non-zero-sized layout; the block is used only here.
        // The block is deliberately leaked: the next run must not see it.
        let heap_dirty = unsafe {
            let block = std::alloc::alloc_zeroed(layout);
            if block.is_null() {
                return Err(Failure::Permanent("no memory for the heap block".into()));
            }
            count_dirty_then_fill(block, heap_block)
        };
        Ok(Outcome {
            output: format!(
                r#"{{"data": {data}, "bss_dirty": {bss_dirty}, "heap_dirty": {heap_dirty}}}"#
            ),
            spawn: Vec::new(),
            needs_review: false,
        })
    }
}

export!(Residue);
