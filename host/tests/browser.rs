//! The dashboard in a real browser: Debian's headless Chromium, driven by
//! `tests/browser/dashboard.mjs` (playwright-core) against a real `colony
//! serve`. Screenshots land in `target/dashboard/` for a person to look at.
//!
//! Needs /usr/bin/chromium (Debian's `chromium`) and `npm ci --prefix
//! tests/browser`; `.ci/run` installs both. Without them the test says
//! "skipped" in one line, unless `COLONY_REQUIRE_BROWSER` is set (as
//! `.ci/run` sets it): then it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::web::Web;
use common::*;
use serde_json::json;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Why the browser test cannot run here, if it cannot.
fn missing_parts(chromium: &Path) -> Option<String> {
    if !chromium.exists() {
        return Some(format!(
            "no Chromium at {} (Debian: apt-get install chromium chromium-driver; or set COLONY_CHROMIUM)",
            chromium.display()
        ));
    }
    if !repo()
        .join("tests/browser/node_modules/playwright-core")
        .is_dir()
    {
        return Some("playwright-core is not installed (npm ci --prefix tests/browser)".into());
    }
    None
}

#[test]
fn the_dashboard_in_headless_chromium() {
    let chromium =
        PathBuf::from(std::env::var("COLONY_CHROMIUM").unwrap_or("/usr/bin/chromium".into()));
    if let Some(why) = missing_parts(&chromium) {
        // CI installs both: there a skip would pass a test that never ran.
        if std::env::var_os("COLONY_REQUIRE_BROWSER").is_some() {
            panic!("COLONY_REQUIRE_BROWSER is set, and the browser test needs {why}");
        }
        eprintln!("skipped: the browser test needs {why}");
        return;
    }
    let env = Env::new(&["echo", "permanent"]);
    let failed = env.submit(&["permanent", "{}"]);
    let review = env.submit(&["echo", r#"{"needs_review":true,"draft":"A lamp."}"#]);
    let evil =
        r#"<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2;alert(1)">"#;
    let xss = env.submit(&["echo", &json!({ "title": evil }).to_string()]);
    for i in 0..12 {
        env.submit(&["echo", &json!({ "n": i }).to_string()]);
    }
    env.until_idle(&[]);
    assert_eq!(env.show(review)["state"], "review");
    let web = Web::serve(&env);
    let out = repo().join("target/dashboard");
    std::fs::create_dir_all(&out).unwrap();
    let run = Command::new("node")
        .arg(repo().join("tests/browser/dashboard.mjs"))
        .env("BASE", &web.base)
        .env("TOKEN", &web.token)
        .env("FAILED_ID", failed.to_string())
        .env("REVIEW_ID", review.to_string())
        .env("XSS_ID", xss.to_string())
        .env("OUT", &out)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("running node (Debian: apt-get install nodejs)");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the browser run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains(r#""ok":true"#), "{stdout}");
    // What the browser did is in the queue too.
    let task = env.show(review);
    assert_eq!(task["state"], "cancelled");
    assert_eq!(task["feedback"], "Make it shorter, please.");
    for shot in ["overview.png", "task-failed.png", "task-rejected.png"] {
        let bytes = std::fs::read(out.join(shot)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{shot} is not a PNG");
        assert!(bytes.len() > 10_000, "{shot} is nearly empty");
    }
}
