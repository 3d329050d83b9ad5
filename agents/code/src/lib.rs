//! The `code` agent: renders a design spec (the `design` agent's result) into
//! a complete, self-contained HTML product page.
//!
//! Input: the spec from `parent-result` when the task was spawned by
//! `design`, else from the payload. Output: `{"title", "html", "bytes"}`.
//! Every piece of text from the spec is HTML-escaped; the values that go into
//! the stylesheet (colours, font lists, scale) are validated instead, since
//! escaping does not apply inside `<style>`.

#[path = "../../shared/kit.rs"]
pub mod kit;

#[cfg(target_arch = "wasm32")]
#[path = "../../shared/glue.rs"]
mod glue;

use kit::{Done, Failure, Fields, Host, Task};
use serde::Serialize;
use std::fmt::Write as _;

/// The palette's colours, each checked to be `#rrggbb` (stored lower-case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Palette {
    pub primary: String,
    pub secondary: String,
    pub accent: String,
    pub background: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub id: String,
    pub title: String,
    pub body: String,
}

/// What the page is rendered from.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub name: String,
    pub palette: Palette,
    pub heading_font: String,
    pub body_font: String,
    pub scale: f64,
    pub sections: Vec<Section>,
}

/// The code agent's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Page {
    pub title: String,
    pub html: String,
    /// Length of `html` in bytes (UTF-8).
    pub bytes: usize,
}

impl Spec {
    /// Reads and checks a spec; `source` ("payload" or "parent result")
    /// names where it came from in error messages.
    pub fn parse(source: &'static str, text: &str) -> Result<Spec, Failure> {
        let doc = kit::parse_json(source, text)?;
        let f = Fields::root(source, &doc)?;
        let name = f.object("product")?.text("name")?.to_string();

        let p = f.object("palette")?;
        let colour = |key: &str| -> Result<String, Failure> {
            let value = p.string(key)?;
            let digits = value.strip_prefix('#').unwrap_or("");
            if digits.len() == 6 && digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(value.to_ascii_lowercase())
            } else {
                Err(p.error(
                    key,
                    format!("must be a \"#rrggbb\" colour (got \"{value}\")"),
                ))
            }
        };
        let palette = Palette {
            primary: colour("primary")?,
            secondary: colour("secondary")?,
            accent: colour("accent")?,
            background: colour("background")?,
            text: colour("text")?,
        };

        let t = f.object("typography")?;
        let font = |key: &str| -> Result<String, Failure> {
            let value = t.text(key)?;
            let safe = value.len() <= 200
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b' ' | b',' | b'-'));
            if safe {
                Ok(value.to_string())
            } else {
                Err(t.error(
                    key,
                    format!("must be a CSS font list of letters, digits, spaces, commas and hyphens (got {})",
                        kit::describe(&serde_json::Value::from(value))),
                ))
            }
        };
        let heading_font = font("heading")?;
        let body_font = font("body")?;
        const SCALE: &str = "a number from 1 to 2";
        let scale = t.number("scale", SCALE)?;
        if !(1.0..=2.0).contains(&scale) {
            return Err(t.error("scale", format!("must be {SCALE} (got {scale})")));
        }

        let list = f.list("sections", "a non-empty list of sections")?;
        if list.is_empty() {
            return Err(f.error(
                "sections",
                "must be a non-empty list of sections (got an empty list)",
            ));
        }
        let mut sections = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            let s = f.element(&format!("sections[{i}]"), item)?;
            let id = s.text("id")?;
            if id.chars().any(char::is_whitespace) {
                return Err(s.error(
                    "id",
                    format!("must be a non-empty string without spaces (got \"{id}\")"),
                ));
            }
            sections.push(Section {
                id: id.to_string(),
                title: s.text("title")?.to_string(),
                body: s.string("body")?.to_string(),
            });
        }
        Ok(Spec {
            name,
            palette,
            heading_font,
            body_font,
            scale,
            sections,
        })
    }
}

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page for `spec`: a pure function of the spec.
pub fn render(spec: &Spec) -> Page {
    let p = &spec.palette;
    let s = spec.scale;
    let hero = spec.sections.iter().find(|sec| sec.id == "hero");
    let mut html = String::with_capacity(4096);

    // `write!` into a String cannot fail.
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n\
         <meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n",
        title = escape(&spec.name),
    );
    if let Some(hero) = hero.filter(|h| !h.body.trim().is_empty()) {
        let _ = writeln!(
            html,
            "<meta name=\"description\" content=\"{}\">",
            escape(hero.body.trim())
        );
    }
    let _ = write!(
        html,
        "<style>\n\
         :root {{\n  --primary: {primary};\n  --secondary: {secondary};\n  --accent: {accent};\n  \
         --background: {background};\n  --text: {text};\n  --font-heading: {heading};\n  --font-body: {body};\n}}\n\
         *, *::before, *::after {{ box-sizing: border-box; }}\n\
         body {{ margin: 0; background: var(--background); color: var(--text); font-family: var(--font-body); font-size: 1rem; line-height: 1.6; }}\n\
         h1, h2 {{ font-family: var(--font-heading); line-height: 1.2; margin: 0 0 0.5em; }}\n\
         h1 {{ font-size: {h1:.3}rem; }}\n\
         h2 {{ font-size: {h2:.3}rem; color: var(--secondary); }}\n\
         .hero {{ background: var(--primary); color: var(--background); padding: 4rem 1.5rem; text-align: center; }}\n\
         .hero p {{ font-size: {lead:.3}rem; max-width: 40rem; margin: 0 auto; }}\n\
         main {{ max-width: 48rem; margin: 0 auto; padding: 1rem 1.5rem 3rem; }}\n\
         .section {{ padding: 1.5rem 0; }}\n\
         .section-pricing {{ border-top: 4px solid var(--accent); }}\n\
         .section-cta {{ background: var(--accent); color: var(--text); padding: 2rem 1.5rem; border-radius: 0.75rem; text-align: center; }}\n\
         .section-cta h2 {{ color: var(--text); }}\n\
         footer {{ background: var(--secondary); color: var(--background); text-align: center; padding: 1.5rem; }}\n\
         @media (max-width: 40rem) {{ h1 {{ font-size: {h2:.3}rem; }} }}\n\
         </style>\n</head>\n<body>\n",
        primary = p.primary,
        secondary = p.secondary,
        accent = p.accent,
        background = p.background,
        text = p.text,
        heading = spec.heading_font,
        body = spec.body_font,
        h1 = s * s * s,
        h2 = s * s,
        lead = s,
    );

    match hero {
        Some(hero) => {
            let _ = writeln!(html, "<header id=\"{}\" class=\"hero\">", escape(&hero.id));
            let _ = writeln!(html, "<h1>{}</h1>", escape(&hero.title));
            paragraphs(&mut html, &hero.body);
        }
        None => {
            let _ = writeln!(
                html,
                "<header class=\"hero\">\n<h1>{}</h1>",
                escape(&spec.name)
            );
        }
    }
    html.push_str("</header>\n<main>\n");
    for section in spec.sections.iter().filter(|sec| sec.id != "hero") {
        let id = escape(&section.id);
        let _ = writeln!(html, "<section id=\"{id}\" class=\"section section-{id}\">");
        let _ = writeln!(html, "<h2>{}</h2>", escape(&section.title));
        paragraphs(&mut html, &section.body);
        html.push_str("</section>\n");
    }
    let _ = write!(
        html,
        "</main>\n<footer>\n<p>&copy; {}</p>\n</footer>\n</body>\n</html>\n",
        escape(&spec.name)
    );

    let bytes = html.len();
    Page {
        title: spec.name.clone(),
        html,
        bytes,
    }
}

/// One `<p>` per non-blank line of `body`.
fn paragraphs(html: &mut String, body: &str) {
    for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let _ = writeln!(html, "<p>{}</p>", escape(line));
    }
}

/// One run: pick the spec (parent result first), check it, render the page.
pub fn run(task: &Task, host: &mut dyn Host) -> Result<Done, Failure> {
    host.heartbeat("reading the design spec");
    let (source, text) = match &task.parent_result {
        Some(parent) => ("parent result", parent.as_str()),
        None => ("payload", task.payload.as_str()),
    };
    host.info(&format!("rendering the page from the {source}"));
    let spec = Spec::parse(source, text).map_err(|e| kit::report(host, e))?;

    let texts = std::iter::once(&spec.name).chain(
        spec.sections
            .iter()
            .flat_map(|s| [&s.id, &s.title, &s.body]),
    );
    let markup = texts.filter(|t| t.contains(['<', '>'])).count();
    if markup > 0 {
        host.warn(&format!(
            "{markup} text field(s) of the spec contain markup; it is escaped and shown as text"
        ));
    }

    host.heartbeat(&format!(
        "rendering {} sections of \"{}\"",
        spec.sections.len(),
        spec.name
    ));
    let page = render(&spec);
    if !spec.sections.iter().any(|s| s.id == "hero") {
        host.warn("the spec has no \"hero\" section; the header shows only the product name");
    }
    host.info(&format!(
        "rendered \"{}\": {} sections, {} bytes of HTML",
        page.title,
        spec.sections.len(),
        page.bytes
    ));
    Done::json(&page)
}

#[cfg(test)]
mod tests;
