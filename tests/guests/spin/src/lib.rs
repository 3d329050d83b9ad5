//! `spin`: burns CPU forever without ever calling the host, so only the host's
//! fuel/epoch deadline can stop it.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use core::hint::black_box;
use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};

struct Spin;

impl Guest for Spin {
    fn run(_task: Task) -> Result<Outcome, Failure> {
        // `black_box` makes every iteration observable, so the optimiser can
        // neither drop the loop nor turn it into an empty `loop {}`.
        let mut counter: u64 = 0;
        loop {
            counter = black_box(counter.wrapping_add(1));
        }
    }
}

export!(Spin);
