//! A real `colony serve` (or `daemon --http`) on a loopback port, and a
//! client for it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::Value;

use super::Env;

/// The token the tests start servers with.
pub const TOKEN: &str = "test-token-0123456789abcdef";

pub struct Web {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// The token changes need (given, or read off the server's output).
    pub token: String,
    pub client: Client,
}

impl Web {
    /// `colony serve` on a free loopback port, with [`TOKEN`].
    pub fn serve(env: &Env) -> Web {
        Web::start(env, &["serve", "--listen", "127.0.0.1:0", "--token", TOKEN])
    }

    /// Starts `colony ARGS` and waits for it to say where it listens.
    pub fn start(env: &Env, args: &[&str]) -> Web {
        let mut child = env
            .cmd()
            .args(args)
            .env_remove("COLONY_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Until the server has said where it listens, a failure here must
        // not leave it running.
        struct KillOnUnwind(Option<Child>);
        impl Drop for KillOnUnwind {
            fn drop(&mut self) {
                if let Some(child) = &mut self.0 {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let mut guard = KillOnUnwind(Some(child));
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line.clone()).is_err() {
                    eprintln!("{line}");
                }
            }
        });
        let (mut base, mut token) = (None, None);
        let given = args
            .iter()
            .position(|a| *a == "--token")
            .map(|i| args[i + 1].to_string());
        while base.is_none() || (token.is_none() && given.is_none()) {
            let line = rx
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("colony {args:?} did not say where it listens"));
            if let Some(rest) = line.strip_prefix("colony dashboard on ") {
                base = Some(rest.split('/').take(3).collect::<Vec<_>>().join("/"));
            }
            if let Some((_, t)) = line.split_once("`Authorization: Bearer TOKEN`): ") {
                token = Some(t.trim().to_string());
            }
        }
        // Later lines go to the test's own stderr (seen when it fails).
        std::thread::spawn(move || {
            for line in rx {
                eprintln!("{line}");
            }
        });
        // reqwest is built without a default TLS provider (see Cargo.toml).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Web {
            child: guard.0.take().unwrap(),
            base: base.unwrap(),
            token: given.or(token).unwrap(),
            client,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().unwrap()
    }

    /// GET that must answer 200 with JSON.
    pub fn get_json(&self, path: &str) -> Value {
        let response = self.get(path);
        let status = response.status();
        let text = response.text().unwrap();
        assert_eq!(status, 200, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
    }

    /// GET that must answer 200 with HTML.
    pub fn page(&self, path: &str) -> String {
        let response = self.get(path);
        let status = response.status();
        let text = response.text().unwrap();
        assert_eq!(status, 200, "GET {path}: {text}");
        text
    }

    /// A POST with the right token.
    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        send(
            self.client
                .post(self.url(path))
                .bearer_auth(&self.token)
                .body(body.to_string()),
        )
    }

    /// A POST without any credentials.
    pub fn post_anonymous(&self, path: &str, body: &str) -> (u16, Value) {
        send(self.client.post(self.url(path)).body(body.to_string()))
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        super::signal(&self.child, "-TERM");
        self.child.wait().unwrap()
    }
}

/// Sends; returns the status and the JSON body.
pub fn send(request: RequestBuilder) -> (u16, Value) {
    let response = request.send().unwrap();
    let status = response.status().as_u16();
    let text = response.text().unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: {e}: {text:?}"));
    (status, body)
}

impl Drop for Web {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
