use super::*;
use kit::{Level, Recorder};
use serde_json::{Value, json};

fn brief() -> Value {
    json!({
        "name": "Acme Travel Mug",
        "audience": "busy commuters",
        "features": ["leak-proof lid"],
        "price_cents": 4900,
        "cost_cents": 1500,
        "currency": "USD",
        "stock": 120
    })
}

fn run_with(payload: &Value, attempt: u32) -> (Result<Done, Failure>, Recorder) {
    let mut host = Recorder::default();
    let task = Task {
        attempt,
        ..Task::new("ops", &payload.to_string())
    };
    (run(&task, &mut host), host)
}

fn output(payload: &Value) -> (Value, Recorder) {
    let (result, host) = run_with(payload, 1);
    let done = result.expect("the checks pass");
    assert!(done.spawn.is_empty() && !done.needs_review);
    (serde_json::from_str(&done.output).unwrap(), host)
}

fn permanent(payload: &Value) -> String {
    match run_with(payload, 1).0 {
        Err(Failure::Permanent(message)) => message,
        other => panic!("expected a permanent failure for {payload}, got {other:?}"),
    }
}

fn with(field: &str, value: Value) -> Value {
    let mut b = brief();
    b[field] = value;
    b
}

#[test]
fn healthy_product_passes() {
    let (out, host) = output(&brief());
    assert_eq!(
        out,
        json!({"ok": true, "margin_pct": 69.3, "stock": 120, "reorder": false, "currency": "USD"})
    );
    assert!(!host.heartbeats.is_empty());
    assert!(host.count(Level::Info) >= 2);
    assert_eq!(host.count(Level::Warn), 0, "{:?}", host.logs);
}

#[test]
fn low_stock_asks_for_a_reorder() {
    let (out, host) = output(&with("stock", json!(9)));
    assert_eq!(out["reorder"], true);
    assert!(host.logged(Level::Warn, "reorder"), "{:?}", host.logs);
    let (out, _) = output(&with("stock", json!(10)));
    assert_eq!(out["reorder"], false);
    let (out, _) = output(&with("stock", json!(0)));
    assert_eq!(out["reorder"], true);
}

#[test]
fn margin_has_one_decimal_and_never_rounds_up() {
    assert_eq!(margin_tenths(4900, 1500), 693); // 69.387..%
    assert_eq!(margin_tenths(1000, 800), 200);
    assert_eq!(margin_tenths(1000, 875), 125);
    assert_eq!(margin_tenths(1000, 1250), -250);
    assert_eq!(margin_tenths(10_000, 8_004), 199); // 19.96% is shown as 19.9%, not 20.0%
    let (out, _) = output(&with("cost_cents", json!(800)).tap(|b| b["price_cents"] = json!(1000)));
    assert_eq!(out["margin_pct"], 20.0);
    assert_eq!(out["margin_pct"].to_string(), "20.0");
    let (out, _) = output(&with("cost_cents", json!(0)));
    assert_eq!(out["margin_pct"], 100.0);
}

#[test]
fn margin_below_the_floor_is_permanent() {
    let b = with("price_cents", json!(8000)).tap(|b| b["cost_cents"] = json!(7000));
    assert_eq!(
        permanent(&b),
        "payload field \"cost_cents\": margin 12.5% is below the 20% floor"
    );
    let b = with("price_cents", json!(10_000)).tap(|b| b["cost_cents"] = json!(8_004));
    assert_eq!(
        permanent(&b),
        "payload field \"cost_cents\": margin 19.9% is below the 20% floor"
    );
    let b = with("price_cents", json!(1000)).tap(|b| b["cost_cents"] = json!(1250));
    assert_eq!(
        permanent(&b),
        "payload field \"cost_cents\": margin -25.0% is below the 20% floor"
    );
}

#[test]
fn unknown_currency_is_permanent() {
    for code in CURRENCIES {
        assert!(
            run_with(&with("currency", json!(code)), 1).0.is_ok(),
            "{code}"
        );
    }
    assert_eq!(
        permanent(&with("currency", json!("XYZ"))),
        "payload field \"currency\": \"XYZ\" is not a known ISO 4217 code \
         (known: USD, EUR, GBP, JPY, CAD, AUD, CHF, SEK, NOK, DKK)"
    );
    assert!(
        permanent(&with("currency", json!("usd"))).contains("\"usd\" is not a known ISO 4217 code")
    );
}

#[test]
fn negative_stock_is_permanent() {
    assert_eq!(
        permanent(&with("stock", json!(-3))),
        "payload field \"stock\" must be an integer >= 0 (got -3)"
    );
}

#[test]
fn all_broken_rules_are_reported_together() {
    let b = with("currency", json!("ABC")).tap(|b| {
        b["stock"] = json!(-1);
        b["cost_cents"] = json!(4900);
    });
    let message = permanent(&b);
    let parts: Vec<&str> = message.split("; ").collect();
    assert_eq!(parts.len(), 3, "{message}");
    assert!(parts[0].starts_with("payload field \"currency\""));
    assert!(parts[1].starts_with("payload field \"stock\""));
    assert_eq!(
        parts[2],
        "payload field \"cost_cents\": margin 0.0% is below the 20% floor"
    );
}

#[test]
fn flaky_supplier_answers_from_the_third_attempt() {
    let b = with("supplier", json!("flaky"));
    for attempt in [1, 2] {
        let (result, host) = run_with(&b, attempt);
        assert_eq!(
            result,
            Err(Failure::Retryable(format!(
                "supplier flaky did not answer (attempt {attempt})"
            )))
        );
        assert!(host.logged(Level::Warn, "will retry"), "{:?}", host.logs);
        assert!(
            host.heartbeats
                .iter()
                .any(|h| h.contains(&format!("attempt {attempt}")))
        );
    }
    let (result, _) = run_with(&b, 3);
    let out: Value = serde_json::from_str(&result.expect("answers on attempt 3").output).unwrap();
    assert_eq!(out["ok"], true);
    assert!(run_with(&b, 4).0.is_ok());
    // A reliable supplier answers at once.
    assert!(run_with(&with("supplier", json!("acme")), 1).0.is_ok());
}

#[test]
fn bad_input_is_not_retried_even_for_a_flaky_supplier() {
    let b = with("supplier", json!("flaky")).tap(|b| b["currency"] = json!("XYZ"));
    assert!(matches!(run_with(&b, 1).0, Err(Failure::Permanent(_))));
}

#[test]
fn wrong_types_and_missing_fields_are_named() {
    assert!(permanent(&json!("x")).starts_with("payload must be a JSON object"));
    match run(
        &Task::new("ops", "{\"price_cents\": "),
        &mut Recorder::default(),
    ) {
        Err(Failure::Permanent(m)) => assert!(m.starts_with("payload is not valid JSON"), "{m}"),
        other => panic!("{other:?}"),
    }
    for field in ["price_cents", "cost_cents", "currency", "stock"] {
        let mut b = brief();
        b.as_object_mut().unwrap().remove(field);
        assert!(
            permanent(&b).starts_with(&format!("payload field \"{field}\" is missing")),
            "{field}"
        );
    }
    let cases = [
        (
            "price_cents",
            json!(0),
            "payload field \"price_cents\" must be a positive integer (got 0)",
        ),
        (
            "price_cents",
            json!("49.00"),
            "payload field \"price_cents\" must be a positive integer (got \"49.00\")",
        ),
        (
            "cost_cents",
            json!(-5),
            "payload field \"cost_cents\" must be a non-negative integer (got -5)",
        ),
        (
            "cost_cents",
            json!(12.5),
            "payload field \"cost_cents\" must be a non-negative integer (got 12.5)",
        ),
        (
            "currency",
            json!(978),
            "payload field \"currency\" must be a non-empty string (got 978)",
        ),
        (
            "stock",
            json!("many"),
            "payload field \"stock\" must be an integer >= 0 (got \"many\")",
        ),
        (
            "stock",
            json!(2.5),
            "payload field \"stock\" must be an integer >= 0 (got 2.5)",
        ),
        (
            "supplier",
            json!(7),
            "payload field \"supplier\" must be a string (got 7)",
        ),
    ];
    for (field, value, expected) in cases {
        assert_eq!(permanent(&with(field, value)), expected);
    }
    // A null supplier is the same as none.
    assert!(run_with(&with("supplier", Value::Null), 1).0.is_ok());
}

#[test]
fn huge_numbers_do_not_overflow() {
    let b = with("price_cents", json!(i64::MAX)).tap(|b| b["cost_cents"] = json!(i64::MAX / 2));
    let (out, _) = output(&b);
    assert_eq!(out["margin_pct"], 50.0);
    assert!(
        permanent(&with("stock", json!(u64::MAX))).contains("\"stock\" must be an integer >= 0")
    );
}

trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
}

impl Tap for Value {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}

#[test]
fn a_listing_is_recorded_in_agent_state_with_a_set_if_count() {
    let mut host = Recorder::default();
    host.state.insert(LISTED_COUNT.into(), ("4".into(), 4));
    let payload =
        r#"{"name":"Mug","price_cents":2900,"cost_cents":900,"currency":"USD","stock":120}"#;
    run(&Task::new("ops", payload), &mut host).unwrap();
    assert_eq!(host.writes[0].0, "inventory/Mug");
    let entry: serde_json::Value = serde_json::from_str(&host.writes[0].1).unwrap();
    assert_eq!(entry["stock"], 120);
    assert_eq!(
        host.writes[1],
        (LISTED_COUNT.to_string(), "5".to_string(), Some(4))
    );
}

#[test]
fn the_listing_is_published_to_the_shop_as_an_effect() {
    let mut host = Recorder::default();
    let payload = r#"{"name":"Mug","price_cents":2900,"cost_cents":900,"currency":"USD","stock":120,"shop":"http://127.0.0.1:9/"}"#;
    run(&Task::new("ops", payload), &mut host).unwrap();
    let (method, url, body) = &host.effects[0];
    assert_eq!(
        (method.as_str(), url.as_str()),
        ("POST", "http://127.0.0.1:9/listings")
    );
    let listing: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(listing["stock"], 120);
}

#[test]
fn without_a_shop_nothing_is_published() {
    let mut host = Recorder::default();
    let payload = r#"{"price_cents":2900,"cost_cents":900,"currency":"USD","stock":120}"#;
    run(&Task::new("ops", payload), &mut host).unwrap();
    assert!(host.effects.is_empty());
}

#[test]
fn a_supplier_api_that_answers_503_makes_the_run_retry_and_a_200_lets_it_pass() {
    let payload = r#"{"price_cents":2900,"cost_cents":900,"currency":"USD","stock":120,"supplier":"flaky","supplier_url":"http://127.0.0.1:9/suppliers/flaky"}"#;
    let mut host = Recorder::default();
    host.http_answers.push_back(Ok((503, String::new())));
    match run(&Task::new("ops", payload), &mut host) {
        Err(Failure::Retryable(message)) => assert!(message.contains("answered 503"), "{message}"),
        other => panic!("expected a retry, got {other:?}"),
    }
    let mut host = Recorder::default();
    host.http_answers.push_back(Ok((200, "{}".into())));
    // With a supplier API, the simulated flakiness does not apply.
    run(&Task::new("ops", payload), &mut host).unwrap();
    assert_eq!(host.fetched, ["http://127.0.0.1:9/suppliers/flaky"]);
}
