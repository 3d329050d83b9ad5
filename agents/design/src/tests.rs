use super::*;
use kit::{Level, Recorder};
use palette::{Rgb, contrast};
use serde_json::{Value, json};

fn brief() -> Value {
    json!({
        "name": "Acme Travel Mug",
        "audience": "busy commuters",
        "features": ["keeps coffee hot for 6 hours", "leak-proof lid", "dishwasher safe"],
        "price_cents": 4900,
        "currency": "USD",
        "cost_cents": 1500,
        "stock": 120,
        "supplier": "acme"
    })
}

fn run_payload(payload: &str) -> (Result<Done, Failure>, Recorder) {
    let mut host = Recorder::default();
    let result = run(&Task::new("design", payload), &mut host);
    (result, host)
}

fn permanent(payload: Value) -> String {
    match run_payload(&payload.to_string()).0 {
        Err(Failure::Permanent(message)) => message,
        other => panic!("expected a permanent failure for {payload}, got {other:?}"),
    }
}

fn colour(spec: &Value, key: &str) -> Rgb {
    let hex = spec["palette"][key].as_str().unwrap();
    Rgb::parse(hex).unwrap_or_else(|| panic!("palette.{key} = {hex} is not #rrggbb"))
}

#[test]
fn good_brief_gives_a_full_spec_and_spawns_code() {
    let (result, host) = run_payload(&brief().to_string());
    let done = result.expect("the brief is valid");
    let spec: Value = serde_json::from_str(&done.output).unwrap();

    assert_eq!(
        spec["product"],
        json!({
            "name": "Acme Travel Mug",
            "audience": "busy commuters",
            "features": ["keeps coffee hot for 6 hours", "leak-proof lid", "dishwasher safe"],
            "price_cents": 4900,
            "currency": "USD"
        })
    );
    for key in ["primary", "secondary", "accent", "background", "text"] {
        let hex = spec["palette"][key].as_str().unwrap();
        assert!(
            hex.len() == 7
                && hex.starts_with('#')
                && hex[1..]
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{key}: {hex}"
        );
    }
    assert!(HEADING_FONTS.contains(&spec["typography"]["heading"].as_str().unwrap()));
    assert!(BODY_FONTS.contains(&spec["typography"]["body"].as_str().unwrap()));
    assert!(SCALES.contains(&spec["typography"]["scale"].as_f64().unwrap()));

    let sections = spec["sections"].as_array().unwrap();
    let ids: Vec<&str> = sections.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            "hero",
            "feature-1",
            "feature-2",
            "feature-3",
            "pricing",
            "cta"
        ]
    );
    for s in sections {
        assert_eq!(s.as_object().unwrap().len(), 3, "{s}");
        assert!(
            !s["title"].as_str().unwrap().is_empty() && !s["body"].as_str().unwrap().is_empty()
        );
    }
    assert_eq!(sections[0]["title"], "Acme Travel Mug");
    assert!(
        sections[0]["body"]
            .as_str()
            .unwrap()
            .contains("busy commuters")
    );
    assert_eq!(sections[2]["title"], "Leak-proof lid");
    assert!(sections[4]["body"].as_str().unwrap().contains("$49.00"));
    assert!(sections[5]["body"].as_str().unwrap().contains("$49.00"));

    assert_eq!(
        done.spawn,
        vec![Spawn {
            agent: "code".into(),
            payload: "{}".into(),
            priority: 0,
            review: false
        }]
    );
    assert!(!done.needs_review);
    assert!(!host.heartbeats.is_empty());
    assert!(host.count(Level::Info) >= 3, "{:?}", host.logs);
    assert_eq!(host.count(Level::Warn), 0, "{:?}", host.logs);
}

#[test]
fn palette_is_deterministic_and_depends_on_the_name() {
    let spec = |name: &str| {
        let mut b = brief();
        b["name"] = json!(name);
        design(&Brief::from_payload(&b.to_string()).unwrap())
    };
    assert_eq!(spec("Acme Travel Mug"), spec("Acme Travel Mug"));
    assert_eq!(
        spec("Acme Travel Mug").palette,
        spec("  acme travel MUG ").palette
    );
    assert_ne!(
        spec("Acme Travel Mug").palette,
        spec("Zephyr Desk Lamp").palette
    );
}

#[test]
fn every_palette_has_readable_contrast() {
    for i in 0..1000u32 {
        let spec = serde_json::to_value(design(&Brief {
            name: format!("Product {i}"),
            audience: "everyone".into(),
            features: vec!["one".into()],
            price_cents: 100,
            currency: "USD".into(),
        }))
        .unwrap();
        let (bg, text) = (colour(&spec, "background"), colour(&spec, "text"));
        assert!(
            contrast(text, bg) >= 7.0,
            "text on background, product {i}: {spec}"
        );
        assert!(
            contrast(colour(&spec, "primary"), bg) >= 4.5,
            "background on primary, product {i}"
        );
        assert!(
            contrast(colour(&spec, "secondary"), bg) >= 4.5,
            "secondary on background, product {i}"
        );
        assert!(
            contrast(colour(&spec, "accent"), text) >= 4.5,
            "text on accent, product {i}"
        );
    }
}

#[test]
fn contrast_matches_wcag() {
    let (black, white) = (Rgb(0, 0, 0), Rgb(255, 255, 255));
    assert!((contrast(black, white) - 21.0).abs() < 1e-9);
    assert!((contrast(white, white) - 1.0).abs() < 1e-9);
    assert_eq!(palette::hsl(0, 100, 50), Rgb(255, 0, 0));
    assert_eq!(palette::hsl(120, 100, 25), Rgb(0, 128, 0));
    assert_eq!(Rgb::parse("#0a0B0c"), Some(Rgb(10, 11, 12)));
    assert_eq!(Rgb::parse("0a0b0c"), None);
}

#[test]
fn prices_are_formatted_per_currency() {
    assert_eq!(format_price(4900, "USD"), "$49.00");
    assert_eq!(format_price(4900, "EUR"), "49.00 EUR");
    assert_eq!(format_price(5, "GBP"), "0.05 GBP");
    assert_eq!(format_price(124_950, "USD"), "$1,249.50");
    assert_eq!(format_price(100_000_000, "USD"), "$1,000,000.00");

    let mut b = brief();
    b["currency"] = json!("EUR");
    let spec = design(&Brief::from_payload(&b.to_string()).unwrap());
    let pricing = spec.sections.iter().find(|s| s.id == "pricing").unwrap();
    assert!(pricing.body.starts_with("49.00 EUR"), "{}", pricing.body);
}

#[test]
fn one_section_per_feature() {
    let mut b = brief();
    b["features"] = json!(["a", "b", "c", "d", "e"]);
    let spec = design(&Brief::from_payload(&b.to_string()).unwrap());
    assert_eq!(spec.sections.len(), 5 + 3);
    assert!(
        spec.sections[0].body.contains("a, b, c, and more"),
        "{}",
        spec.sections[0].body
    );
}

#[test]
fn notable_briefs_are_warned_about() {
    let mut b = brief();
    b["price_cents"] = json!(0);
    b["features"] = json!(["Lid", "lid"]);
    let (result, host) = run_payload(&b.to_string());
    assert!(result.is_ok());
    assert!(host.logged(Level::Warn, "free"), "{:?}", host.logs);
    assert!(host.logged(Level::Warn, "listed twice"), "{:?}", host.logs);
}

#[test]
fn payload_must_be_a_json_object() {
    let (result, host) = run_payload("not json");
    match result {
        Err(Failure::Permanent(m)) => assert!(m.starts_with("payload is not valid JSON"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(host.logged(Level::Warn, "giving up"));
    assert_eq!(
        permanent(json!([1, 2])),
        "payload must be a JSON object (got a list)"
    );
}

#[test]
fn missing_fields_are_named() {
    for field in ["name", "audience", "features", "price_cents", "currency"] {
        let mut b = brief();
        b.as_object_mut().unwrap().remove(field);
        let message = permanent(b);
        assert!(
            message.starts_with(&format!("payload field \"{field}\" is missing")),
            "{message}"
        );
    }
}

#[test]
fn wrong_types_are_named() {
    let cases = [
        (
            "name",
            json!(42),
            "payload field \"name\" must be a non-empty string (got 42)",
        ),
        (
            "name",
            json!("   "),
            "payload field \"name\" must be a non-empty string (got an empty string)",
        ),
        (
            "audience",
            json!(null),
            "payload field \"audience\" must be a non-empty string (got null)",
        ),
        (
            "features",
            json!([]),
            "payload field \"features\" must be a non-empty list of non-empty strings (got an empty list)",
        ),
        (
            "features",
            json!("mug"),
            "payload field \"features\" must be a non-empty list of non-empty strings (got \"mug\")",
        ),
        (
            "features",
            json!(["ok", 7]),
            "payload field \"features[1]\" must be a non-empty string (got 7)",
        ),
        (
            "price_cents",
            json!(-1),
            "payload field \"price_cents\" must be a non-negative integer (got -1)",
        ),
        (
            "price_cents",
            json!(49.5),
            "payload field \"price_cents\" must be a non-negative integer (got 49.5)",
        ),
        (
            "price_cents",
            json!("4900"),
            "payload field \"price_cents\" must be a non-negative integer (got \"4900\")",
        ),
        (
            "currency",
            json!("usd"),
            "payload field \"currency\" must be a three-letter ISO 4217 code such as \"USD\" (got \"usd\")",
        ),
        (
            "currency",
            json!(840),
            "payload field \"currency\" must be a non-empty string (got 840)",
        ),
    ];
    for (field, value, expected) in cases {
        let mut b = brief();
        b[field] = value;
        assert_eq!(permanent(b), expected);
    }
}
