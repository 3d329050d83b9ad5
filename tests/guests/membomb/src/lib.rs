//! `membomb`: grows its memory without bound, so only the host's memory limit
//! can stop it.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use core::hint::black_box;
use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};

const MIB: usize = 1 << 20;

struct Membomb;

impl Guest for Membomb {
    fn run(_task: Task) -> Result<Outcome, Failure> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // A non-zero fill writes every byte, so the pages are really
            // touched; keeping each chunk alive means nothing is ever freed.
            let chunk = vec![0xA5_u8; MIB];
            hoard.push(black_box(chunk));
            black_box(&hoard);
        }
    }
}

export!(Membomb);
