//! RFC 3339 times on the command line: reading `--at` and a batch line's
//! `run_at` (any offset, `Z`, fractional seconds) and printing stored times.
//! humantime reads only `Z` and fails to print years past 9999, so both
//! directions are here, on the proleptic Gregorian calendar (days from
//! civil dates after Howard Hinnant's algorithms).

/// The latest time accepted and printed: 9999-12-31T23:59:59.999Z, in ms
/// since the Unix epoch.
pub const MAX_MS: i64 = 253_402_300_799_999;
/// The earliest time printed: 0000-01-01T00:00:00.000Z.
const MIN_MS: i64 = -62_167_219_200_000;
const DAY_MS: i64 = 86_400_000;

/// Reads an RFC 3339 time (`2026-11-27T18:00:00Z`, `…+01:00`,
/// `…18:00:00.250-05:30`) into ms since the Unix epoch. `t` or a space may
/// separate date and time; without an offset the time is UTC. The instant
/// must lie between 1970-01-01 and 9999-12-31 (UTC).
pub fn parse(text: &str) -> Result<i64, String> {
    let b = text.as_bytes();
    let sep = |i: usize, c: u8| b.get(i) == Some(&c);
    if b.len() < 19 || !sep(4, b'-') || !sep(7, b'-') || !sep(13, b':') || !sep(16, b':') {
        return Err("not a date and time of the form YYYY-MM-DDTHH:MM:SS".into());
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return Err("the date and the time must be separated by T".into());
    }
    let year = digits(b, 0, 4)?;
    let month = digits(b, 5, 2)?;
    let day = digits(b, 8, 2)?;
    let (hour, minute, second) = (digits(b, 11, 2)?, digits(b, 14, 2)?, digits(b, 17, 2)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(format!("there is no day {:04}-{month:02}-{day:02}", year));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(format!(
            "there is no time {hour:02}:{minute:02}:{second:02}"
        ));
    }
    let (fraction_ms, rest) = fraction(&text[19..])?;
    let offset_ms = offset(rest)?;
    let ms = days_from_civil(year, month, day) * DAY_MS
        + ((hour * 60 + minute) * 60 + second) * 1000
        + fraction_ms
        - offset_ms;
    if ms < 0 {
        return Err("the time is before 1970-01-01T00:00:00Z".into());
    }
    if ms > MAX_MS {
        return Err("the time is after 9999-12-31T23:59:59.999Z, the latest accepted".into());
    }
    Ok(ms)
}

/// `count` ASCII digits at `at` as a number.
fn digits(b: &[u8], at: usize, count: usize) -> Result<i64, String> {
    let field = b.get(at..at + count).unwrap_or_default();
    if field.len() != count || !field.iter().all(u8::is_ascii_digit) {
        return Err(format!("expected {count} digits at character {}", at + 1));
    }
    Ok(field.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
}

/// An optional `.123…` (any number of digits, truncated to ms) and the rest.
fn fraction(text: &str) -> Result<(i64, &str), String> {
    let Some(after_dot) = text.strip_prefix('.') else {
        return Ok((0, text));
    };
    let len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
    if len == 0 {
        return Err("expected digits after the decimal point of the seconds".into());
    }
    let ms = format!("{:0<3}", &after_dot[..len.min(3)]);
    Ok((ms.parse().unwrap_or(0), &after_dot[len..]))
}

/// `Z`, `+HH:MM`, `-HH:MM` or nothing (UTC), in ms east of UTC.
fn offset(text: &str) -> Result<i64, String> {
    let sign = match text.as_bytes().first() {
        None | Some(b'Z' | b'z') if text.len() <= 1 => return Ok(0),
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => {
            return Err(format!(
                "unexpected {text:?} after the time (expected Z or an offset like +01:00)"
            ));
        }
    };
    let b = text.as_bytes();
    if b.len() != 6 || b[3] != b':' {
        return Err(format!("the offset {text:?} is not of the form +HH:MM"));
    }
    let (hours, minutes) = (digits(b, 1, 2)?, digits(b, 4, 2)?);
    if hours > 23 || minutes > 59 {
        return Err(format!("the offset {text} is out of range"));
    }
    Ok(sign * (hours * 60 + minutes) * 60_000)
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The civil date (year, month, day) of a day since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Prints ms since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`. Total: a
/// value beyond years 0000–9999 (which no command stores) prints as the
/// nearest of those bounds rather than failing.
pub fn format(ms: i64) -> String {
    let ms = ms.clamp(MIN_MS, MAX_MS);
    let (days, in_day) = (ms.div_euclid(DAY_MS), ms.rem_euclid(DAY_MS));
    let (year, month, day) = civil_from_days(days);
    let (secs, millis) = (in_day / 1000, in_day % 1000);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn reads_any_offset_z_and_fractions() {
        let utc = parse("2026-11-27T17:00:00Z").unwrap();
        assert_eq!(parse("2026-11-27T18:00:00+01:00"), Ok(utc));
        assert_eq!(parse("2026-11-27T11:30:00-05:30"), Ok(utc));
        assert_eq!(parse("2026-11-27t17:00:00z"), Ok(utc));
        assert_eq!(parse("2026-11-27 17:00:00"), Ok(utc), "weak form: UTC");
        assert_eq!(parse("2026-11-27T17:00:00.25Z"), Ok(utc + 250));
        assert_eq!(parse("2026-11-27T17:00:00.123999+00:00"), Ok(utc + 123));
        assert_eq!(parse("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse("9999-12-31T23:59:59.999Z"), Ok(MAX_MS));
        assert_eq!(
            parse("2024-02-29T00:00:00Z").map(format).as_deref(),
            Ok("2024-02-29T00:00:00.000Z")
        );
    }

    #[test]
    fn agrees_with_humantime_where_both_read() {
        for text in [
            "2026-11-27T18:00:00Z",
            "2000-02-29T12:34:56.789Z",
            "2100-03-01T00:00:00Z",
        ] {
            let theirs = humantime::parse_rfc3339(text).unwrap();
            let ours = UNIX_EPOCH + Duration::from_millis(parse(text).unwrap() as u64);
            assert_eq!(ours, theirs, "{text}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_time_naming_the_part() {
        for (text, says) in [
            ("tomorrow", "YYYY-MM-DD"),
            ("2026-13-01T00:00:00Z", "no day"),
            ("2026-02-29T00:00:00Z", "no day"),
            ("2026-11-27T24:00:00Z", "no time"),
            ("2026-11-27T18:00:00+1:00", "+HH:MM"),
            ("2026-11-27T18:00:00+24:00", "out of range"),
            ("2026-11-27T18:00:00.Z", "decimal point"),
            ("2026-11-27T18:00:00 UTC", "unexpected"),
            ("2026-11-27T18:00:00Zjunk", "unexpected"),
            ("2026-1x-27T18:00:00Z", "digits"),
            ("1969-12-31T23:59:59Z", "before 1970"),
            ("9999-12-31T23:59:59-01:00", "after 9999"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn prints_every_value_without_failing() {
        assert_eq!(format(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format(MAX_MS), "9999-12-31T23:59:59.999Z");
        assert_eq!(format(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(format(i64::MIN), "0000-01-01T00:00:00.000Z");
        assert_eq!(format(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn prints_what_it_reads_and_what_humantime_prints() {
        let mut ms = 0;
        while ms <= MAX_MS {
            let text = format(ms);
            assert_eq!(parse(&text), Ok(ms), "{text}");
            let theirs =
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms as u64));
            assert_eq!(text, theirs.to_string());
            ms += 1_234_567_891_011; // about 39 years and odd hours
        }
    }
}
