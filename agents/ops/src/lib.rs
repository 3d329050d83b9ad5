//! The `ops` agent: checks a product's pricing and stock before launch.
//!
//! Input (payload): the product brief; `price_cents`, `cost_cents`,
//! `currency`, `stock` and the optional `supplier` are used.
//! Rules: the currency is a known ISO 4217 code, stock is an integer >= 0,
//! and the margin `(price - cost) / price` is at least 20%. Broken rules are
//! permanent failures naming the field and the rule. The supplier "flaky"
//! does not answer on the first two attempts (a retryable failure, to show
//! the host's backoff) and answers from the third on.
//!
//! Output: `{"ok": true, "margin_pct", "stock", "reorder", "currency"}`.

#[path = "../../shared/kit.rs"]
pub mod kit;

#[cfg(target_arch = "wasm32")]
#[path = "../../shared/glue.rs"]
mod glue;

use kit::{Done, Failure, Fields, Host, Task};
use serde::Serialize;

/// The currencies the store sells in.
pub const CURRENCIES: [&str; 10] = [
    "USD", "EUR", "GBP", "JPY", "CAD", "AUD", "CHF", "SEK", "NOK", "DKK",
];
/// The lowest acceptable margin, in percent.
pub const MARGIN_FLOOR_PCT: i64 = 20;
/// Stock below this is flagged for reordering.
pub const REORDER_POINT: i64 = 10;
/// The supplier that does not answer on the first attempts.
pub const FLAKY_SUPPLIER: &str = "flaky";
/// The attempt from which the flaky supplier answers.
pub const FLAKY_ANSWERS_FROM: u32 = 3;

/// The parts of the brief ops checks (types already checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The product's name, when the brief gives one (keys its inventory entry).
    pub name: Option<String>,
    /// The shop's API (`"shop": "http://…"` in the brief): the listing is
    /// published there once the task completes.
    pub shop: Option<String>,
    pub price_cents: i64,
    pub cost_cents: i64,
    pub currency: String,
    pub stock: i64,
    pub supplier: Option<String>,
    /// The supplier's API (`"supplier_url": "http://…"`): asked over HTTP
    /// for availability. Without it, the supplier "flaky" is simulated.
    pub supplier_url: Option<String>,
}

/// The ops agent's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub ok: bool,
    /// The margin in percent, rounded down to one decimal.
    pub margin_pct: f64,
    pub stock: i64,
    pub reorder: bool,
    pub currency: String,
}

const STOCK_RULE: &str = "an integer >= 0";

impl Check {
    /// Reads the fields; a missing field or a wrong type is a permanent
    /// failure naming the field. A negative stock is left to [`check`], as a
    /// broken rule.
    pub fn from_payload(payload: &str) -> Result<Check, Failure> {
        let doc = kit::parse_json("payload", payload)?;
        let f = Fields::root("payload", &doc)?;
        Ok(Check {
            name: f.opt_string("name")?.map(str::to_string),
            shop: f.opt_string("shop")?.map(str::to_string),
            price_cents: f.int_at_least("price_cents", 1, "a positive integer")?,
            cost_cents: f.int_at_least("cost_cents", 0, "a non-negative integer")?,
            currency: f.text("currency")?.to_string(),
            stock: f.int("stock", STOCK_RULE)?,
            supplier: f.opt_string("supplier")?.map(str::to_string),
            supplier_url: f.opt_string("supplier_url")?.map(str::to_string),
        })
    }
}

/// The margin `(price - cost) / price` in tenths of a percent, rounded down
/// (so a margin is never reported above what it is).
pub fn margin_tenths(price_cents: i64, cost_cents: i64) -> i64 {
    let price = i128::from(price_cents.max(1));
    let tenths = (price - i128::from(cost_cents)) * 1000;
    tenths
        .div_euclid(price)
        .clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// "37.5%" from tenths.
fn pct(tenths: i64) -> String {
    let sign = if tenths < 0 { "-" } else { "" };
    format!("{sign}{}.{}%", (tenths / 10).abs(), (tenths % 10).abs())
}

/// Applies the rules for the given attempt: a pure function of its inputs.
/// All broken rules are reported together, joined by "; ".
pub fn check(c: &Check, attempt: u32) -> Result<Report, Failure> {
    let mut broken = Vec::new();
    if !CURRENCIES.contains(&c.currency.as_str()) {
        broken.push(format!(
            "payload field \"currency\": \"{}\" is not a known ISO 4217 code (known: {})",
            c.currency,
            CURRENCIES.join(", ")
        ));
    }
    if c.stock < 0 {
        broken.push(format!(
            "payload field \"stock\" must be {STOCK_RULE} (got {})",
            c.stock
        ));
    }
    let tenths = margin_tenths(c.price_cents, c.cost_cents);
    // Compare exactly, in integers: (price - cost) / price >= floor / 100.
    let below_floor = (i128::from(c.price_cents) - i128::from(c.cost_cents)) * 100
        < i128::from(MARGIN_FLOOR_PCT) * i128::from(c.price_cents);
    if below_floor {
        broken.push(format!(
            "payload field \"cost_cents\": margin {} is below the {MARGIN_FLOOR_PCT}% floor",
            pct(tenths)
        ));
    }
    if !broken.is_empty() {
        return Err(Failure::Permanent(broken.join("; ")));
    }
    if c.supplier_url.is_none()
        && c.supplier.as_deref() == Some(FLAKY_SUPPLIER)
        && attempt < FLAKY_ANSWERS_FROM
    {
        return Err(Failure::Retryable(format!(
            "supplier {FLAKY_SUPPLIER} did not answer (attempt {attempt})"
        )));
    }
    Ok(Report {
        ok: true,
        margin_pct: tenths as f64 / 10.0,
        stock: c.stock,
        reorder: c.stock < REORDER_POINT,
        currency: c.currency.clone(),
    })
}

/// The agent-state key counting listed products.
pub const LISTED_COUNT: &str = "listed_count";

/// Agent state: the product's inventory entry, and the count of listings
/// (incremented with set-if, so concurrent ops runs never lose one).
pub fn record_listing(host: &mut dyn Host, task: &Task, c: &Check) {
    let product = c
        .name
        .clone()
        .unwrap_or_else(|| format!("task-{}", task.id));
    let entry =
        serde_json::json!({"stock": c.stock, "currency": c.currency, "price_cents": c.price_cents});
    host.state_set(&format!("inventory/{product}"), &entry.to_string());
    let (count, version) = host
        .state_get(LISTED_COUNT)
        .map_or((0, 0), |(value, version)| {
            (value.parse::<u64>().unwrap_or(0), version)
        });
    host.state_set_if(LISTED_COUNT, &(count + 1).to_string(), version);
}

/// Asks the supplier's API whether it can deliver: a 2xx is yes; anything
/// else (or no answer) is transient, so the run is retried with backoff.
fn ask_supplier(host: &mut dyn Host, url: &str, attempt: u32) -> Result<(), Failure> {
    match host.http_get(url) {
        Ok((status, _)) if (200..300).contains(&status) => {
            host.info(&format!("supplier at {url} answered {status}"));
            Ok(())
        }
        Ok((status, _)) => Err(Failure::Retryable(format!(
            "supplier at {url} answered {status} (attempt {attempt})"
        ))),
        Err(why) => Err(Failure::Retryable(format!(
            "supplier at {url} did not answer: {why} (attempt {attempt})"
        ))),
    }
}

/// One run: read the numbers, apply the rules, ask the supplier.
pub fn run(task: &Task, host: &mut dyn Host) -> Result<Done, Failure> {
    host.heartbeat("checking pricing and stock");
    let c = Check::from_payload(&task.payload).map_err(|e| kit::report(host, e))?;
    host.info(&format!(
        "price {} / cost {} {} cents, stock {}, supplier {}",
        c.price_cents,
        c.cost_cents,
        c.currency,
        c.stock,
        c.supplier.as_deref().unwrap_or("(none)")
    ));
    // The listing is recorded before the supplier answers: if it does not,
    // the run fails and these writes are discarded with it, so a listing
    // that needed three attempts still counts once.
    record_listing(host, task, &c);
    if let Some(supplier) = &c.supplier {
        host.heartbeat(&format!(
            "asking supplier {supplier} (attempt {} of {})",
            task.attempt, task.max_attempts
        ));
    }
    if let Some(url) = &c.supplier_url {
        ask_supplier(host, url, task.attempt).map_err(|e| kit::report(host, e))?;
    }
    let report = check(&c, task.attempt).map_err(|e| kit::report(host, e))?;
    host.info(&format!(
        "margin {} clears the {MARGIN_FLOOR_PCT}% floor",
        pct(margin_tenths(c.price_cents, c.cost_cents))
    ));
    if report.reorder {
        host.warn(&format!(
            "stock {} is below the reorder point of {REORDER_POINT}: reorder",
            report.stock
        ));
    } else {
        host.info(&format!(
            "stock {} is above the reorder point of {REORDER_POINT}",
            report.stock
        ));
    }
    publish_listing(host, &c, &report)?;
    Done::json(&report)
}

/// Publishes the listing to the shop as an effect: sent once the task
/// completes, never by an attempt that fails, with an idempotency key the
/// shop can use to list the product once.
fn publish_listing(host: &mut dyn Host, c: &Check, report: &Report) -> Result<(), Failure> {
    let Some(shop) = &c.shop else {
        return Ok(());
    };
    let listing = serde_json::json!({
        "name": c.name,
        "price_cents": c.price_cents,
        "currency": c.currency,
        "stock": report.stock,
    });
    let url = format!("{}/listings", shop.trim_end_matches('/'));
    match host.send_after_commit("POST", &url, &listing.to_string()) {
        Ok(seq) => {
            host.info(&format!(
                "the listing will be published to {url} once this task completes (effect {seq})"
            ));
            Ok(())
        }
        Err(why) => Err(kit::report(
            host,
            Failure::Permanent(format!("cannot publish the listing to {url}: {why}")),
        )),
    }
}

#[cfg(test)]
mod tests;
