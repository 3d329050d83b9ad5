//! The wasm engines: how each is configured (the pooling allocator, how a
//! finished run's memory is reset, copy-on-write images for large
//! components) and the linker of the host's imports that goes with it.
//! A [`Flavor`] is one engine and its linker; the runtime holds one for
//! small components and makes one for large ones on first use.

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::sandbox::RunState;
use super::{RuntimeConfig, RuntimeError, bindings, bindings_v0_1};

/// Components at least this big (interpreted agents: a Python component
/// is ~18 MB, a JavaScript one ~13 MB) are compiled for a second engine
/// that maps their memory image copy-on-write: copying megabytes of data
/// segments into every instance cost 4–10 ms a run, mapping them ~1.5 ms.
/// Smaller ones (Rust agents carry kilobytes) are copied, which is cheaper
/// for them under concurrency (see [`engine_config`]).
pub const LARGE_COMPONENT: usize = 1 << 20;

/// Of a large component's memory, how much a finished run's slot resets in
/// place (from the image) for the next, instead of handing the pages back
/// to the kernel and faulting them in again.
const KEEP_RESIDENT_LARGE: usize = 16 << 20;

/// Of a small component's memory, how much a finished run's slot resets in
/// place when the kernel can say which pages the run wrote (Linux 6.7's
/// `PAGEMAP_SCAN`): only those pages are zeroed, up to this many bytes, and
/// the next run finds them resident. Without the scan nothing is kept: a
/// Rust agent's stack sits below its data, so resetting "the first N bytes"
/// would zero a megabyte of untouched stack every run. (Measured on the
/// no-op drain: 1.36x the tasks/s, run time on the workers 38 -> 18 µs a
/// task, once page faults and `madvise` left the per-run path.)
const KEEP_RESIDENT_SCANNED: usize = 4 << 20;

/// An engine and the linker of the host's imports for it.
pub(super) struct Flavor {
    pub(super) engine: Engine,
    pub(super) linker: Linker<RunState>,
}

/// The `colony:agent@0.2.0` interfaces the host implements on [`RunState`].
/// (`bindings::Agent::add_to_linker` would also link the world's
/// `wasi:http` import, which wasmtime-wasi-http provides instead.)
fn link_colony_interfaces(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    use bindings::colony::agent::{effects, host, model, state, types};
    types::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    host::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    model::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    state::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    effects::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    Ok(())
}

/// Fewest core instances (and tables) the pool holds however few runs it
/// is sized for: one component of another language's toolchain may need
/// dozens.
const CORE_INSTANCES_FLOOR: u32 = 64;
/// Fewest linear memories the pool holds.
const MEMORIES_FLOOR: u32 = 8;

fn engine_config(pooling: Option<u32>, copy_on_write: bool) -> Config {
    let scan_dirty_pages = PoolingAllocationConfig::is_pagemap_scan_available();
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.consume_fuel(true);
    // For small components, copy data segments into a fresh instance's
    // memory instead of mapping the image copy-on-write: every first write
    // to a CoW page is a fault plus a TLB shootdown across cores, several
    // per run, which cost more than copying an agent's few kilobytes of
    // data (measured: the drain 4 % slower, overhead p50 14 -> 16-21 µs).
    config.memory_init_cow(copy_on_write);
    if let Some(slots) = pooling {
        let mut pool = PoolingAllocationConfig::default();
        // Each Rust component holds a few core instances (the program and
        // small adapter shims), one memory and a few tables; a Python one
        // (componentize-py: libc, libpython, the runtime, adapters) more
        // than 8. The floor lets one such run instantiate even in a pool
        // sized for a single run (`colony agents` loads each agent once).
        pool.total_component_instances(slots)
            .total_core_instances((slots * 8).max(CORE_INSTANCES_FLOOR))
            .total_memories((slots * 2).max(MEMORIES_FLOOR))
            .total_tables((slots * 8).max(CORE_INSTANCES_FLOOR))
            .total_stacks(slots)
            .max_memory_size(4 << 30)
            .max_tables_per_module(4)
            .max_memories_per_module(2)
            // Reset small, recently used regions in place (memset) instead of
            // returning them to the kernel: madvise on every teardown costs a
            // TLB shootdown across cores, which dominated per-task cost.
            .table_keep_resident(64 << 10)
            .async_stack_keep_resident(128 << 10)
            //
            // Which regions those are, the kernel's page map tells where it
            // can: a run's memory is then reset without a single madvise,
            // and the next run takes no page faults (see
            // `KEEP_RESIDENT_SCANNED`).
            .pagemap_scan(match scan_dirty_pages {
                true => Enabled::Yes,
                false => Enabled::No,
            })
            .linear_memory_keep_resident(match (copy_on_write, scan_dirty_pages) {
                (true, _) => KEEP_RESIDENT_LARGE,
                (false, true) => KEEP_RESIDENT_SCANNED,
                (false, false) => 0,
            })
            // What a run wrote beyond the region reset in place goes back
            // to the kernel when the run ends. Batched, each finished memory
            // bomb stayed resident until 64 were queued (64 x `memory_mb`:
            // 1.5 GiB after 24 runs of 64 MiB). With the page scan an
            // ordinary run queues nothing, so batching bought nothing; without
            // it every run queues its memory, and a batch of 4 bounds what
            // finished runs keep while sparing most runs a madvise.
            .decommit_batch_size(match scan_dirty_pages {
                true => 1,
                false => 4,
            });
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

impl Flavor {
    /// Builds an engine, probing the pooling allocator first (it needs a
    /// large virtual address reservation some machines refuse) and falling
    /// back to on-demand allocation; returns whether it pools.
    pub(super) fn new(
        config: &RuntimeConfig,
        copy_on_write: bool,
    ) -> Result<(Flavor, bool), RuntimeError> {
        let pooled = if config.pooling {
            let slots = config.max_concurrent_runs.max(1);
            match Engine::new(&engine_config(Some(slots), copy_on_write)) {
                Ok(engine) => Some(engine),
                Err(e) => {
                    tracing::warn!(
                        "pooling allocator unavailable, using on-demand allocation: {e}"
                    );
                    None
                }
            }
        } else {
            None
        };
        let pooling = pooled.is_some();
        let engine = match pooled {
            Some(engine) => engine,
            None => {
                Engine::new(&engine_config(None, copy_on_write)).map_err(RuntimeError::Engine)?
            }
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(RuntimeError::Engine)?;
        link_colony_interfaces(&mut linker).map_err(RuntimeError::Engine)?;
        // `wasi:http/outgoing-handler` and `wasi:http/types`; the requests
        // go through the run's `HttpPolicy` (http.rs).
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(RuntimeError::Engine)?;
        bindings_v0_1::Agent::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(RuntimeError::Engine)?;
        Ok((Flavor { engine, linker }, pooling))
    }
}
