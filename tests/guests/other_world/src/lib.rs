//! `other_world`: a valid component of an unrelated world. It does not export
//! `colony:agent/handler`, so loading it as an agent must fail cleanly.

wit_bindgen::generate!({ world: "other", path: "wit" });

use exports::colony::other::thing::Guest;

struct Other;

impl Guest for Other {
    fn hello() -> String {
        "hello from another world".into()
    }
}

export!(Other);
