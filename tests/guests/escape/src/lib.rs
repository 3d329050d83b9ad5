//! `escape`: tries to reach outside the sandbox (files, environment, network)
//! and reports what happened, so tests can assert what the host grants.
//! Each report starts with `allowed: ` or `denied: `.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};
use serde_json::json;

struct Escape;

fn try_file() -> String {
    match std::fs::read_to_string("/etc/passwd") {
        Ok(text) => format!("allowed: read {} bytes of /etc/passwd", text.len()),
        Err(e) => format!("denied: {e}"),
    }
}

fn try_env() -> String {
    let home = std::env::var("HOME");
    let count = std::env::vars().count();
    match home {
        Ok(home) => format!("allowed: HOME={home}, {count} variables"),
        Err(_) if count > 0 => format!("allowed: HOME unset, {count} variables"),
        Err(e) => format!("denied: HOME: {e}; 0 variables"),
    }
}

/// TCP to a closed port may be refused even with network access, so a UDP
/// bind is tried as well: either one succeeding means the network is granted.
fn try_socket() -> String {
    let tcp = std::net::TcpStream::connect("127.0.0.1:80");
    let udp = std::net::UdpSocket::bind("0.0.0.0:0");
    match (tcp, udp) {
        (Ok(_), _) => "allowed: tcp connected to 127.0.0.1:80".into(),
        (Err(tcp), Ok(sock)) => match sock.local_addr() {
            Ok(addr) => format!("allowed: udp bound {addr} (tcp: {tcp})"),
            Err(_) => format!("allowed: udp bound (tcp: {tcp})"),
        },
        (Err(tcp), Err(udp)) => format!("denied: tcp: {tcp}; udp: {udp}"),
    }
}

impl Guest for Escape {
    fn run(_task: Task) -> Result<Outcome, Failure> {
        let output = json!({ "file": try_file(), "env": try_env(), "socket": try_socket() });
        Ok(Outcome {
            output: output.to_string(),
            spawn: Vec::new(),
            needs_review: false,
        })
    }
}

export!(Escape);
