//! The `design` agent: turns a product brief into a design spec (palette,
//! typography, page sections) and hands it to the `code` agent, which renders
//! the page from this task's result.
//!
//! Input (payload): `{"name", "audience", "features": [..], "price_cents", "currency", ..}`.
//! Output: `{"product": {..}, "palette": {..}, "typography": {..}, "sections": [..]}`,
//! plus one spawned `code` task with payload `{}`.

#[path = "../../shared/kit.rs"]
pub mod kit;
pub mod palette;

#[cfg(target_arch = "wasm32")]
#[path = "../../shared/glue.rs"]
mod glue;

use kit::{Done, Failure, Fields, Host, Spawn, Task};
pub use palette::Palette;
use serde::Serialize;

/// The parts of the product brief the design needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Brief {
    pub name: String,
    pub audience: String,
    pub features: Vec<String>,
    pub price_cents: i64,
    pub currency: String,
}

impl Brief {
    /// Reads and checks the brief; a bad payload is a permanent failure
    /// naming the field.
    pub fn from_payload(payload: &str) -> Result<Brief, Failure> {
        let doc = kit::parse_json("payload", payload)?;
        let f = Fields::root("payload", &doc)?;
        let name = f.text("name")?;
        let audience = f.text("audience")?;
        let features = f.text_list("features", true)?;
        let price_cents = f.int_at_least("price_cents", 0, "a non-negative integer")?;
        let currency = f.text("currency")?;
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(f.error(
                "currency",
                format!(
                    "must be a three-letter ISO 4217 code such as \"USD\" (got \"{currency}\")"
                ),
            ));
        }
        Ok(Brief {
            name: name.to_string(),
            audience: audience.to_string(),
            features: features.into_iter().map(str::to_string).collect(),
            price_cents,
            currency: currency.to_string(),
        })
    }
}

/// Type choices: CSS font stacks (letters, digits, spaces, commas, hyphens
/// only) and the modular scale ratio between heading sizes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Typography {
    pub heading: String,
    pub body: String,
    pub scale: f64,
}

/// One block of the product page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Section {
    pub id: String,
    pub title: String,
    pub body: String,
}

/// The design agent's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DesignSpec {
    pub product: Brief,
    pub palette: Palette,
    pub typography: Typography,
    pub sections: Vec<Section>,
}

const HEADING_FONTS: [&str; 6] = [
    "Playfair Display, Georgia, serif",
    "Montserrat, Helvetica, Arial, sans-serif",
    "Merriweather, Georgia, serif",
    "Space Grotesk, Helvetica, Arial, sans-serif",
    "Poppins, Helvetica, Arial, sans-serif",
    "Lora, Georgia, serif",
];
const BODY_FONTS: [&str; 4] = [
    "Inter, system-ui, sans-serif",
    "Open Sans, system-ui, sans-serif",
    "Lato, system-ui, sans-serif",
    "Nunito Sans, system-ui, sans-serif",
];
const SCALES: [f64; 4] = [1.2, 1.25, 1.333, 1.5];

/// `cents` in `currency` for people: "$1,249.00" for USD, "49.00 EUR" otherwise.
pub fn format_price(cents: i64, currency: &str) -> String {
    let units = (cents / 100).unsigned_abs().to_string();
    let mut grouped = String::new();
    for (i, digit) in units.chars().enumerate() {
        if i > 0 && (units.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    let sign = if cents < 0 { "-" } else { "" };
    let minor = (cents % 100).unsigned_abs();
    if currency == "USD" {
        format!("{sign}${grouped}.{minor:02}")
    } else {
        format!("{sign}{grouped}.{minor:02} {currency}")
    }
}

/// The design for `brief`: a pure function of the brief. Colours and type
/// come from a hash of the (trimmed, lower-cased) name, so a product keeps its
/// look across runs.
pub fn design(brief: &Brief) -> DesignSpec {
    let hash = kit::fnv1a(brief.name.trim().to_lowercase().as_bytes());
    let typography = Typography {
        heading: HEADING_FONTS[((hash >> 20) % HEADING_FONTS.len() as u64) as usize].to_string(),
        body: BODY_FONTS[((hash >> 28) % BODY_FONTS.len() as u64) as usize].to_string(),
        scale: SCALES[((hash >> 36) % SCALES.len() as u64) as usize],
    };
    DesignSpec {
        product: brief.clone(),
        palette: palette::derive(hash),
        typography,
        sections: sections(brief),
    }
}

fn sections(brief: &Brief) -> Vec<Section> {
    let name = &brief.name;
    let audience = &brief.audience;
    let price = format_price(brief.price_cents, &brief.currency);
    let features: Vec<&str> = brief.features.iter().map(String::as_str).collect();
    let highlights = if features.len() > 3 {
        format!("{}, and more", features[..3].join(", "))
    } else {
        kit::join_and(&features)
    };

    let mut sections = vec![Section {
        id: "hero".into(),
        title: name.clone(),
        body: format!("{name} for {audience}: {highlights}."),
    }];
    for (i, feature) in features.iter().enumerate() {
        let body = match i % 3 {
            0 => format!("Built for {audience}: {feature}."),
            1 => format!(
                "{} comes standard with every {name}.",
                kit::capitalize(feature)
            ),
            _ => format!("Why it matters: {feature}, without compromise."),
        };
        sections.push(Section {
            id: format!("feature-{}", i + 1),
            title: kit::capitalize(feature),
            body,
        });
    }
    sections.push(Section {
        id: "pricing".into(),
        title: "Pricing".into(),
        body: format!("{price}. One price, every feature above included."),
    });
    sections.push(Section {
        id: "cta".into(),
        title: format!("Get {name} today"),
        body: format!("Made for {audience}. Order now for {price}."),
    });
    sections
}

/// One run: read the brief, design, and spawn `code` to render the page.
pub fn run(task: &Task, host: &mut dyn Host) -> Result<Done, Failure> {
    host.heartbeat("reading the product brief");
    let brief = Brief::from_payload(&task.payload).map_err(|e| kit::report(host, e))?;
    host.info(&format!(
        "designing \"{}\" for {} ({} features, {})",
        brief.name,
        brief.audience,
        brief.features.len(),
        format_price(brief.price_cents, &brief.currency)
    ));
    if brief.price_cents == 0 {
        host.warn("price_cents is 0: the page will present the product as free");
    }
    if brief.features.len() > 8 {
        host.warn(&format!(
            "{} features make a long page; consider trimming the brief",
            brief.features.len()
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for feature in &brief.features {
        if !seen.insert(feature.to_lowercase()) {
            host.warn(&format!(
                "feature \"{feature}\" is listed twice; it gets two sections"
            ));
        }
    }

    host.heartbeat("deriving the palette and laying out sections");
    let spec = design(&brief);
    let p = &spec.palette;
    host.info(&format!(
        "palette primary {} secondary {} accent {} on {} / text {}; type {} / {} at scale {}",
        p.primary,
        p.secondary,
        p.accent,
        p.background,
        p.text,
        spec.typography.heading,
        spec.typography.body,
        spec.typography.scale
    ));

    let mut done = Done::json(&spec)?;
    done.spawn.push(Spawn {
        agent: "code".into(),
        payload: "{}".into(),
        priority: 0,
        review: false,
    });
    host.info(&format!(
        "{} sections designed; spawning code to render the page",
        spec.sections.len()
    ));
    Ok(done)
}

#[cfg(test)]
mod tests;
