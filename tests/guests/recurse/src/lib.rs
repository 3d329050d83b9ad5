//! `recurse`: recurses forever, so the host's wasm stack limit must stop it
//! (a `stack_overflow` trap).

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};

/// Never equal to a reachable depth, but read volatilely so the compiler
/// cannot prove the recursion endless (and mark it `noreturn`).
static FLOOR: u64 = u64::MAX;

struct Recurse;

/// Each frame keeps eight values alive across the recursive call and mixes
/// them into the result afterwards with non-commutative operations, so the
/// call is neither a tail call nor an accumulator loop the optimiser could
/// rewrite. The values live in wasm locals, i.e. on the engine's native stack:
/// that is the stack the host limits. Anything address-taken (a local array,
/// `black_box`) would live on the guest's 1 MiB shadow stack in linear memory
/// instead, whose overflow is an out-of-bounds access, not a stack overflow.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn dive(depth: u64, a: u64, b: u64, c: u64, d: u64, e: u64, f: u64, g: u64) -> u64 {
    // SAFETY: `FLOOR` is a valid, initialised static.
    if depth == unsafe { core::ptr::read_volatile(&FLOOR) } {
        return a ^ g;
    }
    let below = dive(
        depth.wrapping_add(1),
        b.rotate_left(1),
        c ^ depth,
        d.wrapping_mul(3),
        e.wrapping_add(a),
        f ^ a,
        g.rotate_right(3),
        a,
    );
    below
        .rotate_left(a as u32)
        .wrapping_sub(b)
        .rotate_right(c as u32)
        .wrapping_mul(d | 1)
        .wrapping_sub(e)
        .rotate_left(f as u32)
        .wrapping_sub(g)
}

impl Guest for Recurse {
    fn run(task: Task) -> Result<Outcome, Failure> {
        let seed = task.id;
        let depth = dive(
            0,
            seed,
            seed + 1,
            seed + 2,
            seed + 3,
            seed + 4,
            seed + 5,
            seed + 6,
        );
        Ok(Outcome {
            output: depth.to_string(),
            spawn: Vec::new(),
            needs_review: false,
        })
    }
}

export!(Recurse);
