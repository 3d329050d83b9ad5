//! The `marketing` agent: writes launch copy (tagline, email, three social
//! posts) for a product and always asks for review, since copy is published
//! only after a person approves it. After a rejection the host runs the task
//! again with the reviewer's `feedback`; the next revision applies it.
//!
//! Input (payload): the product brief; `name`, `audience` and `features` are used.
//! Output: `{"tagline", "email": {"subject", "body"}, "social": [..],
//! "revision", "addressed_feedback"}`.

#[path = "../../shared/kit.rs"]
pub mod kit;

#[cfg(target_arch = "wasm32")]
#[path = "../../shared/glue.rs"]
mod glue;

use kit::{Done, Failure, Fields, Host, Task};
use serde::Serialize;

/// The parts of the product brief the copy needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brief {
    pub name: String,
    pub audience: String,
    pub features: Vec<String>,
}

impl Brief {
    pub fn from_payload(payload: &str) -> Result<Brief, Failure> {
        let doc = kit::parse_json("payload", payload)?;
        let f = Fields::root("payload", &doc)?;
        Ok(Brief {
            name: f.text("name")?.to_string(),
            audience: f.text("audience")?.to_string(),
            features: f
                .text_list("features", true)?
                .into_iter()
                .map(str::to_string)
                .collect(),
        })
    }
}

/// Platform limits, in characters.
pub const LIMITS: [(&str, usize); 3] = [("x", 280), ("linkedin", 3000), ("instagram", 2200)];

/// What a reviewer's note asks for, by keyword.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Asks {
    /// "shorter", "too long", "concise", "brief", "punchier", "wordy"
    pub shorter: bool,
    /// "audience", "who is it for", "target", "customer"
    pub audience: bool,
    /// "longer", "more detail", "all features", "too short"
    pub longer: bool,
    /// "formal", "professional", "serious", "no emoji"
    pub formal: bool,
    /// "playful", "fun", "exciting", "casual", "energy"
    pub playful: bool,
}

impl Asks {
    pub fn from_feedback(feedback: &str) -> Asks {
        let f = feedback.to_lowercase();
        let any = |words: &[&str]| words.iter().any(|w| f.contains(w));
        let shorter = any(&[
            "shorter", "shorten", "too long", "concise", "brief", "punchier", "wordy",
        ]);
        let formal = any(&["formal", "professional", "serious", "no emoji"]);
        Asks {
            shorter,
            audience: any(&[
                "audience",
                "who is it for",
                "who it's for",
                "target",
                "customer",
            ]),
            longer: !shorter
                && any(&[
                    "longer",
                    "more detail",
                    "all features",
                    "all the features",
                    "too short",
                ]),
            formal,
            playful: !formal && any(&["playful", "fun", "exciting", "casual", "energy"]),
        }
    }

    pub fn any(self) -> bool {
        self != Asks::default()
    }

    /// The asks, for logs: "shorter, audience".
    pub fn describe(self) -> String {
        let names = [
            (self.shorter, "shorter"),
            (self.audience, "audience"),
            (self.longer, "longer"),
            (self.formal, "formal"),
            (self.playful, "playful"),
        ];
        names
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Email {
    pub subject: String,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Post {
    pub platform: String,
    pub text: String,
}

/// The marketing agent's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Copy {
    pub tagline: String,
    pub email: Email,
    pub social: Vec<Post>,
    pub revision: u32,
    pub addressed_feedback: Option<String>,
    /// `template`, or `model:<alias>` when a granted model wrote the tagline
    /// and the e-mail.
    pub written_by: String,
}

/// How the copy was written, for the run's logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notes {
    pub asks: Asks,
    /// Feedback was given but matched no rule: alternate wording was used.
    pub unmatched_feedback: bool,
    /// Platforms whose post was cut to the limit.
    pub truncated: Vec<&'static str>,
}

/// The revision number: the attempt, and at least 2 once a reviewer has
/// given feedback (feedback means a previous revision was rejected).
pub fn revision(attempt: u32, feedback: Option<&str>) -> u32 {
    let attempt = attempt.max(1);
    if feedback.is_some() {
        attempt.max(2)
    } else {
        attempt
    }
}

/// `#CamelCase` of the words of `text`, or nothing if it has no letters or digits.
fn hashtag(text: &str) -> Option<String> {
    let tag: String = text
        .split(|c: char| !c.is_alphanumeric())
        .map(kit::capitalize)
        .collect();
    (!tag.is_empty()).then(|| format!("#{tag}"))
}

/// The copy for `brief`: a pure function of the brief, the attempt and the
/// reviewer's feedback (blank feedback counts as none).
pub fn write_copy(brief: &Brief, attempt: u32, feedback: Option<&str>) -> (Copy, Notes) {
    let feedback = feedback.map(str::trim).filter(|f| !f.is_empty());
    let asks = feedback.map(Asks::from_feedback).unwrap_or_default();
    let unmatched_feedback = feedback.is_some() && !asks.any();
    let name = brief.name.as_str();
    let audience = brief.audience.as_str();
    let features: Vec<&str> = brief.features.iter().map(String::as_str).collect();

    // The default tagline names two features; "longer" names them all.
    let list = if features.len() > 2 {
        format!("{}, and more", features[..2].join(", "))
    } else {
        kit::join_and(&features)
    };
    let all = kit::join_and(&features);
    let end = if asks.playful { "!" } else { "." };
    let tagline = if asks.shorter {
        // Drop all but the first feature, or all of them when the default
        // names only one, so that it really is shorter.
        if asks.audience {
            format!("{name}, made for {audience}{end}")
        } else if features.len() > 1 {
            format!("{name}. {}{end}", kit::capitalize(features[0]))
        } else {
            format!("{name}{end}")
        }
    } else {
        match (asks.audience, asks.longer) {
            (true, true) => format!("{name}, made for {audience}, brings you {all}{end}"),
            (true, false) => format!("{name}, made for {audience}: {list}{end}"),
            (false, true) => format!("{name} brings you {all}{end}"),
            (false, false) if unmatched_feedback => format!("Meet {name}: {list}{end}"),
            (false, false) => format!("{name}: {list}{end}"),
        }
    };

    let subject = match (asks.shorter, asks.audience, asks.playful) {
        (true, _, _) => format!("{name} is here"),
        (false, true, _) => format!("{name}, made for {audience}"),
        (false, false, true) => format!("Say hello to {name}!"),
        (false, false, false) if unmatched_feedback => format!("Meet {name}"),
        (false, false, false) => format!("Introducing {name}"),
    };
    let email_features = if asks.shorter {
        &features[..features.len().min(3)]
    } else {
        &features[..]
    };
    let mut body = format!(
        "{greeting}\n\n{tagline}\n\nWe built {name} for {audience}. What you get:\n",
        greeting = if asks.formal {
            "Dear customer,"
        } else {
            "Hi there,"
        }
    );
    for feature in email_features {
        body.push_str(&format!("- {feature}\n"));
    }
    body.push_str(&format!(
        "\n{}\n\n{}\nThe {name} team\n",
        if asks.playful {
            format!("Grab yours today: you will wonder how you lived without {name}!")
        } else {
            format!("{name} is available now.")
        },
        if asks.formal {
            "Kind regards,"
        } else {
            "Cheers,"
        },
    ));

    let tags: Vec<String> = [hashtag(name), hashtag(audience)]
        .into_iter()
        .flatten()
        .collect();
    let x = format!(
        "{}{tagline} {}",
        if asks.playful { "🎉 " } else { "" },
        tags.join(" ")
    );
    let mut linkedin = format!("Introducing {name}, made for {audience}.\n\n");
    for feature in &features {
        linkedin.push_str(&format!("• {}\n", kit::capitalize(feature)));
    }
    linkedin.push_str(&format!("\n{tagline}\n\n{} #ProductLaunch", tags.join(" ")));
    let sparkle = if asks.formal { "" } else { " ✨" };
    let instagram = format!(
        "{tagline}{sparkle}\n\n{}\n\n{} #NewDrop",
        features.join(" · "),
        tags.join(" ")
    );

    let mut truncated = Vec::new();
    let social = LIMITS
        .iter()
        .zip([x, linkedin, instagram])
        .map(|(&(platform, limit), text)| {
            let (text, cut) = kit::truncate_chars(text.trim(), limit);
            if cut {
                truncated.push(platform);
            }
            Post {
                platform: platform.into(),
                text,
            }
        })
        .collect();

    let copy = Copy {
        tagline,
        email: Email { subject, body },
        social,
        revision: revision(attempt, feedback),
        addressed_feedback: feedback.map(str::to_string),
        written_by: "template".into(),
    };
    (
        copy,
        Notes {
            asks,
            unmatched_feedback,
            truncated,
        },
    )
}

/// The model alias the marketing agent asks for copy (granted in its manifest).
pub const COPY_MODEL: &str = "copy";

const COPY_SYSTEM: &str = "You write launch copy for an online store. Answer with one JSON object \
     {\"tagline\": string, \"subject\": string, \"body\": string}: a tagline under 90 characters, \
     an e-mail subject and a short, friendly e-mail body. No claims the brief does not make.";

/// The prompt for the copy model: the brief, and the reviewer's note on a revision.
pub fn copy_prompt(brief: &Brief, feedback: Option<&str>) -> String {
    let mut prompt = format!(
        "Product: {}\nAudience: {}\nFeatures:\n",
        brief.name, brief.audience
    );
    for feature in &brief.features {
        prompt.push_str(&format!("- {feature}\n"));
    }
    if let Some(note) = feedback.map(str::trim).filter(|n| !n.is_empty()) {
        prompt.push_str(&format!(
            "\nA reviewer rejected the previous draft with this note; address it: {note}\n"
        ));
    }
    prompt
}

#[derive(serde::Deserialize)]
struct ModelCopy {
    tagline: String,
    subject: String,
    body: String,
}

/// Lets the granted model write the tagline and the e-mail. Without a model
/// the template copy stands; an answer that is not the asked-for JSON is
/// logged and the template stands too; a failed call (budget, provider
/// trouble) is a retryable failure of the run.
fn write_with_model(
    brief: &Brief,
    feedback: Option<&str>,
    copy: &mut Copy,
    host: &mut dyn Host,
) -> Result<(), Failure> {
    let prompt = copy_prompt(brief, feedback);
    match host.ask_json(COPY_MODEL, COPY_SYSTEM, &prompt, 600) {
        Ok(text) => match serde_json::from_str::<ModelCopy>(&text) {
            Ok(m) if !m.tagline.trim().is_empty() && !m.body.trim().is_empty() => {
                copy.tagline = m.tagline.trim().to_string();
                copy.email.subject = m.subject.trim().to_string();
                copy.email.body = m.body.trim().to_string();
                copy.written_by = format!("model:{COPY_MODEL}");
                host.info("the copy model wrote the tagline and the e-mail");
            }
            _ => {
                host.warn("the copy model's answer was not the JSON asked for; using the template")
            }
        },
        Err(kit::ModelRefusal::NotAvailable(why)) => {
            host.info(&format!("no copy model ({why}); using the template"));
        }
        Err(kit::ModelRefusal::Failed(why)) => {
            return Err(kit::report(
                host,
                Failure::Retryable(format!("the copy model failed: {why}")),
            ));
        }
    }
    Ok(())
}

/// One run: read the brief, write the copy, and ask for review.
pub fn run(task: &Task, host: &mut dyn Host) -> Result<Done, Failure> {
    host.heartbeat("reading the product brief");
    let brief = Brief::from_payload(&task.payload).map_err(|e| kit::report(host, e))?;
    let rev = revision(
        task.attempt,
        task.feedback
            .as_deref()
            .map(str::trim)
            .filter(|f| !f.is_empty()),
    );
    host.heartbeat(&format!(
        "drafting launch copy for \"{}\" (revision {rev})",
        brief.name
    ));
    host.info(&format!(
        "writing copy for \"{}\", aimed at {} (attempt {})",
        brief.name, brief.audience, task.attempt
    ));

    let (copy, notes) = write_copy(&brief, task.attempt, task.feedback.as_deref());
    match &copy.addressed_feedback {
        Some(feedback) if notes.unmatched_feedback => host.warn(&format!(
            "feedback \"{feedback}\" matched no rule (shorter, audience, longer, formal, playful); using alternate wording"
        )),
        Some(feedback) => host.info(&format!("applied reviewer feedback \"{feedback}\": {}", notes.asks.describe())),
        None if task.feedback.is_some() => host.warn("the reviewer's feedback is blank; writing the default copy"),
        None => {}
    }
    for platform in &notes.truncated {
        let limit = LIMITS
            .iter()
            .find(|(p, _)| p == platform)
            .map_or(0, |(_, l)| *l);
        host.warn(&format!(
            "the {platform} post was cut to its {limit}-character limit"
        ));
    }
    let mut copy = copy;
    write_with_model(&brief, task.feedback.as_deref(), &mut copy, host)?;
    host.info(&format!("tagline: {}", copy.tagline));
    host.info("copy is ready and waits for review before it is published");

    // What was published, per product: held with the result until the
    // review approves it, dropped with a rejected revision.
    let published = serde_json::json!({"tagline": copy.tagline, "revision": copy.revision, "written_by": copy.written_by});
    host.state_set(&format!("published/{}", brief.name), &published.to_string());
    let mut done = Done::json(&copy)?;
    done.needs_review = true;
    Ok(done)
}

#[cfg(test)]
mod tests;
