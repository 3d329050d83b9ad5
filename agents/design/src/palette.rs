//! Colour maths: a palette derived from a hash of the product name, with
//! every colour pair the page uses checked against WCAG contrast ratios.

use serde::Serialize;

/// An sRGB colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rgb(pub u8, pub u8, pub u8);

impl Rgb {
    /// `#rrggbb`.
    pub fn hex(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }

    /// Parses `#rrggbb`.
    pub fn parse(hex: &str) -> Option<Rgb> {
        let digits = hex.strip_prefix('#')?;
        if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let channel = |i: usize| u8::from_str_radix(&digits[i..i + 2], 16).ok();
        Some(Rgb(channel(0)?, channel(2)?, channel(4)?))
    }

    /// WCAG 2 relative luminance.
    pub fn luminance(self) -> f64 {
        fn linear(c: u8) -> f64 {
            let c = f64::from(c) / 255.0;
            if c <= 0.040_45 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            }
        }
        0.2126 * linear(self.0) + 0.7152 * linear(self.1) + 0.0722 * linear(self.2)
    }
}

/// WCAG 2 contrast ratio between two colours (1.0 ..= 21.0).
pub fn contrast(a: Rgb, b: Rgb) -> f64 {
    let (la, lb) = (a.luminance(), b.luminance());
    let (hi, lo) = if la >= lb { (la, lb) } else { (lb, la) };
    (hi + 0.05) / (lo + 0.05)
}

/// HSL (hue in degrees, saturation and lightness in percent) to sRGB.
pub fn hsl(hue: u32, saturation: u32, lightness: u32) -> Rgb {
    let h = f64::from(hue % 360) / 60.0;
    let s = f64::from(saturation.min(100)) / 100.0;
    let l = f64::from(lightness.min(100)) / 100.0;
    let chroma = (1.0 - (2.0 * l - 1.0).abs()) * s;
    let x = chroma * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (chroma, x, 0.0),
        1 => (x, chroma, 0.0),
        2 => (0.0, chroma, x),
        3 => (0.0, x, chroma),
        4 => (x, 0.0, chroma),
        _ => (chroma, 0.0, x),
    };
    let m = l - chroma / 2.0;
    let channel = |v: f64| ((v + m) * 255.0).round().clamp(0.0, 255.0) as u8;
    Rgb(channel(r), channel(g), channel(b))
}

/// Starting from `lightness`, moves the lightness down (`darker`) or up until
/// the colour reaches `min` contrast against `other` (black and white always
/// do for the light and dark colours used here).
fn with_contrast(
    hue: u32,
    saturation: u32,
    lightness: u32,
    other: Rgb,
    min: f64,
    darker: bool,
) -> Rgb {
    let mut l = lightness.min(100);
    loop {
        let colour = hsl(hue, saturation, l);
        let at_end = if darker { l == 0 } else { l == 100 };
        if contrast(colour, other) >= min || at_end {
            return colour;
        }
        l = if darker { l - 1 } else { l + 1 };
    }
}

/// Minimum contrast of body text on the background (WCAG AAA).
pub const TEXT_CONTRAST: f64 = 7.0;
/// Minimum contrast of the other pairs the page uses (WCAG AA).
pub const UI_CONTRAST: f64 = 4.5;

/// The page's colours as `#rrggbb`. How the code agent uses them: `text` on
/// `background` (body copy), `background` on `primary` (hero), `secondary`
/// on `background` (headings), `text` on `accent` (call to action).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Palette {
    pub primary: String,
    pub secondary: String,
    pub accent: String,
    pub background: String,
    pub text: String,
}

/// Derives the palette from `hash`: the base hue comes from the hash, the
/// secondary colour is analogous (+30°), the accent complementary (+180°).
pub fn derive(hash: u64) -> Palette {
    let hue = (hash % 360) as u32;
    let saturation = 55 + ((hash >> 12) % 25) as u32; // 55..80 %
    let background = hsl(hue, 40, 97);
    let mut text = with_contrast(hue, 35, 14, background, TEXT_CONTRAST, true);
    let background = if contrast(text, background) >= TEXT_CONTRAST {
        background
    } else {
        text = Rgb(0x11, 0x11, 0x11);
        Rgb(0xff, 0xff, 0xff)
    };
    let primary = with_contrast(hue, saturation, 45, background, UI_CONTRAST, true);
    let secondary = with_contrast(hue + 30, saturation - 10, 35, background, UI_CONTRAST, true);
    let accent = with_contrast(hue + 180, 80, 55, text, UI_CONTRAST, false);
    Palette {
        primary: primary.hex(),
        secondary: secondary.hex(),
        accent: accent.hex(),
        background: background.hex(),
        text: text.hex(),
    }
}
