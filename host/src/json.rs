//! JSON as the host takes it in. The host reads documents into
//! `serde_json::Value`s that keep every digit of a number and the order of
//! an object's keys (serde_json's `arbitrary_precision` and
//! `preserve_order`), so a payload re-written on its way (`submit --batch`,
//! `--next`, a spawn) reaches its agent as it was given. The agents' own
//! readers are not so kind: one number is refused.

use serde_json::{Number, Value};

/// The first number in `value` past what a 64-bit float holds (`1e999`):
/// the host could keep it, but the JSON readers agents use (serde_json as
/// usually built, Python's, JavaScript's) read numbers as such floats and
/// refuse it or make it infinite. Digits past a float's precision are kept.
fn number_past_f64(value: &Value) -> Option<&Number> {
    match value {
        Value::Number(n) => n.as_f64().is_none().then_some(n),
        Value::Array(items) => items.iter().find_map(number_past_f64),
        Value::Object(map) => map.values().find_map(number_past_f64),
        _ => None,
    }
}

/// Why `value` may not be stored, if it holds a number past a float's range.
pub fn check_numbers(value: &Value) -> Result<(), String> {
    let Some(number) = number_past_f64(value) else {
        return Ok(());
    };
    let text = number.to_string();
    let shown = match text.len() > 40 {
        true => format!("{}… ({} characters)", &text[..40], text.len()),
        false => text,
    };
    Err(format!(
        "the number {shown} is past the largest an agent's JSON reader takes (about 1.8e308, a 64-bit float); send it as a string"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_numbers_past_a_floats_range_are_refused() {
        let read = |text: &str| serde_json::from_str::<Value>(text).unwrap();
        let exact = r#"{"z":1,"a":123456789012345678901234567890,"c":0.1000000000000000055511151231257827}"#;
        assert_eq!(read(exact).to_string(), exact, "digits and key order kept");
        assert!(check_numbers(&read(exact)).is_ok());
        assert!(check_numbers(&read("[1.7976931348623157e308, -5e-324]")).is_ok());
        // Named as serde_json writes it.
        for (past, named) in [("1e999", "1e+999"), ("[0, {\"a\": -1e309}]", "-1e+309")] {
            let why = check_numbers(&read(past)).unwrap_err();
            assert!(
                why.starts_with(&format!("the number {named} is past")),
                "{past}: {why}"
            );
        }
        let long = format!("1{}", "0".repeat(400));
        let why = check_numbers(&read(&long)).unwrap_err();
        assert!(why.contains("(401 characters)"), "{why}");
    }
}
