//! Printing model usage: per task (`show`), per listed task (`list`) and
//! per agent and alias over the last day (`status`).

use std::io::Write;

use anyhow::Result;
use serde_json::{Value, json};

use crate::queue::{ModelCallRow, SpendRow, TaskUsage};

pub fn usage_json(usage: &TaskUsage) -> Value {
    json!({
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "calls": usage.calls,
        "refused": usage.refused,
        "replayed": usage.replayed,
        "cost_usd": usage.cost_usd,
        "reserved_tokens": usage.reserved_tokens,
    })
}

pub fn model_calls_json(calls: &[ModelCallRow]) -> Value {
    Value::Array(
        calls
            .iter()
            .map(|c| {
                json!({
                    "run": c.run,
                    "attempt": c.attempt,
                    "seq": c.seq,
                    "model": c.model,
                    "input_tokens": c.input_tokens,
                    "output_tokens": c.output_tokens,
                    "cost_usd": c.cost_usd,
                    "replayed": c.replayed,
                    "status": c.status,
                    "ms": c.ms,
                    "sent": c.sent,
                })
            })
            .collect(),
    )
}

fn cost(usd: Option<f64>) -> String {
    usd.map_or_else(|| "-".to_string(), format_usd)
}

/// Dollars to four places, or to two significant digits below a cent: a
/// call to a cheap model costs a few millionths, which four places showed
/// as $0.0000.
pub fn format_usd(usd: f64) -> String {
    if usd == 0.0 || usd >= 0.01 {
        return format!("${usd:.4}");
    }
    let places = ((-usd.log10()).ceil() as usize + 1).clamp(4, 12);
    format!("${usd:.places$}")
}

/// The `model calls:` section of `colony show`.
pub fn print_model_calls(
    out: &mut impl Write,
    usage: &TaskUsage,
    calls: &[ModelCallRow],
    running: bool,
) -> Result<()> {
    if calls.is_empty() && usage.reserved_tokens == 0 {
        return Ok(());
    }
    writeln!(out, "model calls:")?;
    writeln!(
        out,
        "  {:>3} {:>7} {:>4}  {:<12} {:>9} {:>9} {:>10} {:>7}  {:<8} status",
        "run", "attempt", "seq", "model", "tokens in", "out", "cost", "ms", "replayed"
    )?;
    for c in calls {
        writeln!(
            out,
            "  {:>3} {:>7} {:>4}  {:<12} {:>9} {:>9} {:>10} {:>7}  {:<8} {}",
            c.run,
            c.attempt,
            c.seq,
            c.model,
            c.input_tokens,
            c.output_tokens,
            if c.sent {
                cost(c.cost_usd)
            } else {
                "-".to_string()
            },
            c.ms,
            if c.replayed { "yes" } else { "no" },
            c.status
        )?;
    }
    // As `usage` in --json and the dashboard count them: `calls` sent to a
    // provider, `refused` by this host, `replayed` from the journal.
    let refused = match usage.refused {
        0 => String::new(),
        n => format!(", {n} refused before the provider"),
    };
    writeln!(
        out,
        "  total: {} sent{refused}, {} replayed from the journal; {} tokens in, {} out, cost {}",
        count_calls(usage.calls),
        usage.replayed,
        usage.input_tokens,
        usage.output_tokens,
        cost(usage.cost_usd)
    )?;
    if usage.reserved_tokens > 0 {
        writeln!(out, "  {}", reserved_note(usage.reserved_tokens, running))?;
    }
    Ok(())
}

/// "1 call", "2 calls".
pub fn count_calls(n: u64) -> String {
    match n {
        1 => "1 call".to_string(),
        n => format!("{n} calls"),
    }
}

/// Why a task's budget holds less than its usage says (see
/// [`TaskUsage::reserved_tokens`]), for `show` and the dashboard;
/// `running`: whether a run of the task may still be making a call.
pub(crate) fn reserved_note(tokens: u64, running: bool) -> String {
    let still = if running { ", or still running" } else { "" };
    format!(
        "{tokens} more tokens reserved by calls with no recorded answer (cut off while out with the provider, which may have charged them{still}): they count against the budgets"
    )
}

pub fn spend_json(rows: &[SpendRow]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                // Reservations are a task's, not a time window's.
                let mut usage = usage_json(&r.usage);
                usage.as_object_mut().map(|u| u.remove("reserved_tokens"));
                json!({"agent": r.agent, "model": r.model, "usage": usage})
            })
            .collect(),
    )
}

/// The `model spend` section of `colony status`.
pub fn print_spend(out: &mut impl Write, rows: &[SpendRow]) -> Result<()> {
    if rows.is_empty() {
        writeln!(out, "no model calls in the last 24 h")?;
        return Ok(());
    }
    writeln!(out, "model spend, last 24 h:")?;
    writeln!(
        out,
        "  {:<12} {:<12} {:>7} {:>8} {:>9} {:>11} {:>11} {:>10}",
        "agent", "model", "calls", "refused", "replayed", "tokens in", "tokens out", "cost"
    )?;
    for r in rows {
        let u = &r.usage;
        writeln!(
            out,
            "  {:<12} {:<12} {:>7} {:>8} {:>9} {:>11} {:>11} {:>10}",
            r.agent,
            r.model,
            u.calls,
            u.refused,
            u.replayed,
            u.input_tokens,
            u.output_tokens,
            cost(u.cost_usd)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::format_usd;

    #[test]
    fn costs_below_a_cent_keep_two_significant_digits() {
        assert_eq!(format_usd(0.0312), "$0.0312");
        assert_eq!(format_usd(0.0), "$0.0000");
        assert_eq!(format_usd(0.0012), "$0.0012");
        assert_eq!(format_usd(0.000027), "$0.000027");
        assert_eq!(format_usd(0.00012345), "$0.00012");
        assert_eq!(format_usd(12.5), "$12.5000");
    }
}
