use super::*;
use kit::{Level, Recorder};
use serde_json::{Value, json};

fn spec() -> Value {
    json!({
        "product": {"name": "Acme Travel Mug", "audience": "busy commuters", "features": ["leak-proof lid"],
                    "price_cents": 4900, "currency": "USD"},
        "palette": {"primary": "#1F5A8C", "secondary": "#2d4f6b", "accent": "#f0a830",
                    "background": "#f6f8fa", "text": "#14202b"},
        "typography": {"heading": "Playfair Display, Georgia, serif", "body": "Inter, system-ui, sans-serif", "scale": 1.25},
        "sections": [
            {"id": "hero", "title": "Acme Travel Mug", "body": "Acme Travel Mug for busy commuters: leak-proof lid."},
            {"id": "feature-1", "title": "Leak-proof lid", "body": "Built for busy commuters: leak-proof lid."},
            {"id": "pricing", "title": "Pricing", "body": "$49.00. One price, every feature above included."},
            {"id": "cta", "title": "Get Acme Travel Mug today", "body": "Order now for $49.00."}
        ]
    })
}

fn run_task(task: &Task) -> (Result<Done, Failure>, Recorder) {
    let mut host = Recorder::default();
    let result = run(task, &mut host);
    (result, host)
}

fn page(task: &Task) -> (Page, Recorder) {
    let (result, host) = run_task(task);
    let done = result.expect("the spec is valid");
    assert!(done.spawn.is_empty() && !done.needs_review);
    let out: Value = serde_json::from_str(&done.output).unwrap();
    assert_eq!(out.as_object().unwrap().len(), 3, "{out}");
    let page = Page {
        title: out["title"].as_str().unwrap().into(),
        html: out["html"].as_str().unwrap().into(),
        bytes: out["bytes"].as_u64().unwrap() as usize,
    };
    (page, host)
}

fn permanent(task: &Task) -> String {
    match run_task(task).0 {
        Err(Failure::Permanent(message)) => message,
        other => panic!("expected a permanent failure, got {other:?}"),
    }
}

fn from_payload(spec: &Value) -> Task {
    Task::new("code", &spec.to_string())
}

fn from_parent(spec: &Value) -> Task {
    Task {
        parent_result: Some(spec.to_string()),
        ..Task::new("code", "{}")
    }
}

/// Checks that every element is closed in order (void elements aside) and
/// that nothing but the doctype and tags appear in angle brackets.
fn assert_well_formed(html: &str) {
    const VOID: [&str; 2] = ["meta", "link"];
    let mut stack: Vec<String> = Vec::new();
    let mut rest = html
        .strip_prefix("<!DOCTYPE html>\n")
        .expect("starts with the doctype");
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').expect("tag is closed") + start;
        let tag = &rest[start + 1..end];
        assert!(!tag.contains('<'), "stray < in {tag}");
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        assert!(!name.is_empty(), "not a tag: <{tag}>");
        if tag.starts_with('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.as_str()),
                "unbalanced </{name}>"
            );
        } else if !VOID.contains(&name.as_str()) {
            stack.push(name);
        }
        rest = &rest[end + 1..];
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
}

#[test]
fn renders_a_complete_page_from_the_payload() {
    let (page, host) = page(&from_payload(&spec()));
    let html = &page.html;
    assert_eq!(page.title, "Acme Travel Mug");
    assert_eq!(page.bytes, html.len());
    assert!(html.starts_with("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n"));
    for needle in [
        "<meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        "<title>Acme Travel Mug</title>",
        "<meta name=\"description\" content=\"Acme Travel Mug for busy commuters: leak-proof lid.\">",
        "--primary: #1f5a8c;",
        "--accent: #f0a830;",
        "--background: #f6f8fa;",
        "--text: #14202b;",
        "--font-heading: Playfair Display, Georgia, serif;",
        "--font-body: Inter, system-ui, sans-serif;",
        "h1 { font-size: 1.953rem; }",
        "h2 { font-size: 1.562rem; color: var(--secondary); }",
        "<header id=\"hero\" class=\"hero\">\n<h1>Acme Travel Mug</h1>",
        "<section id=\"feature-1\" class=\"section section-feature-1\">\n<h2>Leak-proof lid</h2>",
        "<section id=\"pricing\" class=\"section section-pricing\">\n<h2>Pricing</h2>\n<p>$49.00. One price",
        "<section id=\"cta\" class=\"section section-cta\">",
        "<footer>\n<p>&copy; Acme Travel Mug</p>\n</footer>\n</body>\n</html>\n",
    ] {
        assert!(html.contains(needle), "missing {needle:?} in\n{html}");
    }
    assert_eq!(html.matches("<h1>").count(), 1);
    assert_eq!(html.matches("<section ").count(), 3);
    assert_well_formed(html);
    assert!(!host.heartbeats.is_empty());
    assert!(host.count(Level::Info) >= 2);
    assert_eq!(host.count(Level::Warn), 0, "{:?}", host.logs);
}

#[test]
fn the_parent_result_wins_over_the_payload() {
    let mut other = spec();
    other["product"]["name"] = json!("From The Payload");
    let task = Task {
        payload: other.to_string(),
        ..from_parent(&spec())
    };
    assert_eq!(page(&task).0.title, "Acme Travel Mug");
    // The payload is not even read when a parent result is there.
    let task = Task {
        payload: "not json".into(),
        ..from_parent(&spec())
    };
    assert_eq!(page(&task).0.title, "Acme Travel Mug");
}

#[test]
fn every_text_is_escaped() {
    let mut s = spec();
    let name = "<script>alert(\"pwned\")</script> & 'Co'";
    s["product"]["name"] = json!(name);
    s["sections"][0]["title"] = json!(name);
    s["sections"][0]["body"] = json!("Fish & chips <b>bold</b>");
    s["sections"][1]["id"] = json!("x\"><script>");
    s["sections"][2]["body"] = json!("Tom's \"best\" price > $40");
    let (page, host) = page(&from_parent(&s));
    let html = &page.html;
    assert_eq!(page.title, name, "the JSON title is the raw name");
    let escaped = "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; &#39;Co&#39;";
    assert!(
        html.contains(&format!("<title>{escaped}</title>")),
        "{html}"
    );
    assert!(html.contains(&format!("<h1>{escaped}</h1>")), "{html}");
    assert!(html.contains(&format!("<p>&copy; {escaped}</p>")), "{html}");
    assert!(
        html.contains("<p>Fish &amp; chips &lt;b&gt;bold&lt;/b&gt;</p>"),
        "{html}"
    );
    assert!(
        html.contains("content=\"Fish &amp; chips &lt;b&gt;bold&lt;/b&gt;\""),
        "{html}"
    );
    assert!(
        html.contains("<section id=\"x&quot;&gt;&lt;script&gt;\""),
        "{html}"
    );
    assert!(
        html.contains("<p>Tom&#39;s &quot;best&quot; price &gt; $40</p>"),
        "{html}"
    );
    assert!(!html.to_lowercase().contains("<script"), "{html}");
    assert!(!html.contains("<b>"));
    assert_well_formed(html);
    assert!(
        host.logged(Level::Warn, "contain markup"),
        "{:?}",
        host.logs
    );
}

#[test]
fn escape_covers_the_five_characters() {
    assert_eq!(
        escape("a & b < c > d \" e ' f"),
        "a &amp; b &lt; c &gt; d &quot; e &#39; f"
    );
    assert_eq!(escape("plain é ✓"), "plain é ✓");
}

#[test]
fn renders_what_design_produces() {
    let brief = json!({"name": "Zephyr <Lamp> & Co", "audience": "night owls", "features": ["dimmable", "USB-C"],
                       "price_cents": 129_900, "currency": "USD"});
    struct Quiet;
    impl design::kit::Host for Quiet {
        fn heartbeat(&mut self, _: &str) {}
        fn log(&mut self, _: design::kit::Level, _: &str) {}
    }
    let designed = design::run(
        &design::kit::Task::new("design", &brief.to_string()),
        &mut Quiet,
    )
    .unwrap();
    let task = from_parent(&serde_json::from_str(&designed.output).unwrap());
    let (page, _) = page(&task);
    assert_eq!(page.title, "Zephyr <Lamp> & Co");
    assert!(page.html.contains("<h1>Zephyr &lt;Lamp&gt; &amp; Co</h1>"));
    assert!(page.html.contains("$1,299.00"));
    assert!(page.html.contains("<h2>USB-C</h2>"));
    assert_well_formed(&page.html);
}

#[test]
fn without_a_hero_the_header_shows_the_name() {
    let mut s = spec();
    s["sections"].as_array_mut().unwrap().remove(0);
    let (page, host) = page(&from_payload(&s));
    assert!(
        page.html
            .contains("<header class=\"hero\">\n<h1>Acme Travel Mug</h1>\n</header>")
    );
    assert!(!page.html.contains("name=\"description\""));
    assert_well_formed(&page.html);
    assert!(host.logged(Level::Warn, "no \"hero\""));
}

#[test]
fn bad_specs_are_permanent_failures_naming_the_field() {
    assert_eq!(
        permanent(&Task::new("code", "{}")),
        "payload field \"product\" is missing; it must be an object"
    );
    assert!(permanent(&Task::new("code", "<html>")).starts_with("payload is not valid JSON"));
    let task = Task {
        parent_result: Some("{oops".into()),
        ..Task::new("code", "{}")
    };
    assert!(permanent(&task).starts_with("parent result is not valid JSON"));
    assert_eq!(
        permanent(&Task::new("code", "\"spec\"")),
        "payload must be a JSON object (got \"spec\")"
    );

    let cases: [(&str, Value, &str); 12] = [
        (
            "/product/name",
            json!(null),
            "parent result field \"product.name\" must be a non-empty string (got null)",
        ),
        (
            "/product",
            json!("mug"),
            "parent result field \"product\" must be an object (got \"mug\")",
        ),
        (
            "/palette/primary",
            json!("red"),
            "parent result field \"palette.primary\" must be a \"#rrggbb\" colour (got \"red\")",
        ),
        (
            "/palette/text",
            json!("#12345g"),
            "parent result field \"palette.text\" must be a \"#rrggbb\" colour (got \"#12345g\")",
        ),
        (
            "/palette/accent",
            json!(7),
            "parent result field \"palette.accent\" must be a string (got 7)",
        ),
        (
            "/typography/heading",
            json!("Arial;}</style><script>"),
            "parent result field \"typography.heading\" must be a CSS font list of letters, digits, spaces, commas and hyphens (got \"Arial;}</style><script>\")",
        ),
        (
            "/typography/scale",
            json!(5),
            "parent result field \"typography.scale\" must be a number from 1 to 2 (got 5)",
        ),
        (
            "/typography/scale",
            json!("big"),
            "parent result field \"typography.scale\" must be a number from 1 to 2 (got \"big\")",
        ),
        (
            "/sections",
            json!([]),
            "parent result field \"sections\" must be a non-empty list of sections (got an empty list)",
        ),
        (
            "/sections/1",
            json!(3),
            "parent result field \"sections[1]\" must be an object (got 3)",
        ),
        (
            "/sections/0/id",
            json!("two words"),
            "parent result field \"sections[0].id\" must be a non-empty string without spaces (got \"two words\")",
        ),
        (
            "/sections/2/body",
            json!(["x"]),
            "parent result field \"sections[2].body\" must be a string (got a list)",
        ),
    ];
    for (pointer, value, expected) in cases {
        let mut s = spec();
        *s.pointer_mut(pointer).unwrap() = value;
        assert_eq!(permanent(&from_parent(&s)), expected);
    }

    let mut s = spec();
    s["sections"][3].as_object_mut().unwrap().remove("title");
    assert_eq!(
        permanent(&from_payload(&s)),
        "payload field \"sections[3].title\" is missing; it must be a non-empty string"
    );
    s["typography"].as_object_mut().unwrap().remove("scale");
    assert_eq!(
        permanent(&from_payload(&s)),
        "payload field \"typography.scale\" is missing; it must be a number from 1 to 2"
    );
}
