use super::*;
use kit::{Level, Recorder};
use serde_json::{Value, json};

fn brief() -> Value {
    json!({
        "name": "Acme Travel Mug",
        "audience": "busy commuters",
        "features": ["keeps coffee hot for 6 hours", "leak-proof lid", "dishwasher safe"],
        "price_cents": 4900,
        "currency": "USD"
    })
}

fn task(payload: &Value, attempt: u32, feedback: Option<&str>) -> Task {
    Task {
        attempt,
        feedback: feedback.map(str::to_string),
        ..Task::new("marketing", &payload.to_string())
    }
}

fn run_ok(task: &Task) -> (Value, Recorder) {
    let mut host = Recorder::default();
    let done = run(task, &mut host).expect("the brief is valid");
    assert!(done.needs_review, "copy always waits for review");
    assert!(done.spawn.is_empty());
    (serde_json::from_str(&done.output).unwrap(), host)
}

fn copy_of(feedback: Option<&str>) -> Copy {
    let brief = Brief::from_payload(&brief().to_string()).unwrap();
    write_copy(&brief, 2, feedback).0
}

fn permanent(payload: &str) -> String {
    match run(&Task::new("marketing", payload), &mut Recorder::default()) {
        Err(Failure::Permanent(message)) => message,
        other => panic!("expected a permanent failure for {payload}, got {other:?}"),
    }
}

fn chars(v: &Value) -> usize {
    v.as_str().unwrap().chars().count()
}

#[test]
fn first_draft_without_feedback() {
    let (out, host) = run_ok(&task(&brief(), 1, None));
    assert_eq!(
        out["tagline"],
        "Acme Travel Mug: keeps coffee hot for 6 hours, leak-proof lid, and more."
    );
    assert_eq!(out["email"]["subject"], "Introducing Acme Travel Mug");
    let body = out["email"]["body"].as_str().unwrap();
    assert!(
        body.starts_with("Hi there,\n\nAcme Travel Mug: keeps coffee"),
        "{body}"
    );
    for feature in [
        "- keeps coffee hot for 6 hours\n",
        "- leak-proof lid\n",
        "- dishwasher safe\n",
    ] {
        assert!(body.contains(feature), "{body}");
    }
    assert!(body.contains("for busy commuters"));
    let social = out["social"].as_array().unwrap();
    let platforms: Vec<&str> = social
        .iter()
        .map(|p| p["platform"].as_str().unwrap())
        .collect();
    assert_eq!(platforms, ["x", "linkedin", "instagram"]);
    assert_eq!(
        social[0]["text"],
        "Acme Travel Mug: keeps coffee hot for 6 hours, leak-proof lid, and more. #AcmeTravelMug #BusyCommuters"
    );
    assert!(
        social[1]["text"]
            .as_str()
            .unwrap()
            .contains("• Dishwasher safe\n")
    );
    assert!(social[2]["text"].as_str().unwrap().contains("✨"));
    for (post, (_, limit)) in social.iter().zip(LIMITS) {
        assert!(chars(&post["text"]) <= limit);
    }
    assert_eq!(out["revision"], 1);
    assert_eq!(out["addressed_feedback"], Value::Null);
    assert_eq!(out["written_by"], "template");
    assert_eq!(out.as_object().unwrap().len(), 6);
    assert!(!host.heartbeats.is_empty());
    assert!(host.count(Level::Info) >= 3);
    assert_eq!(host.count(Level::Warn), 0, "{:?}", host.logs);
}

#[test]
fn revision_follows_attempts_and_feedback() {
    assert_eq!(revision(1, None), 1);
    assert_eq!(revision(3, None), 3);
    assert_eq!(revision(1, Some("shorter")), 2);
    assert_eq!(revision(4, Some("shorter")), 4);
    let (out, _) = run_ok(&task(&brief(), 3, None));
    assert_eq!(out["revision"], 3);
    let (out, _) = run_ok(&task(&brief(), 1, Some("shorter")));
    assert_eq!(out["revision"], 2);
}

#[test]
fn shorter_feedback_shortens_the_tagline() {
    let plain = copy_of(None);
    let (out, host) = run_ok(&task(&brief(), 2, Some("Too wordy, make it shorter")));
    let tagline = out["tagline"].as_str().unwrap();
    assert_eq!(tagline, "Acme Travel Mug. Keeps coffee hot for 6 hours.");
    assert!(tagline.chars().count() < plain.tagline.chars().count());
    assert_eq!(out["email"]["subject"], "Acme Travel Mug is here");
    assert_eq!(out["addressed_feedback"], "Too wordy, make it shorter");
    assert_eq!(out["revision"], 2);
    assert!(
        host.logged(Level::Info, "applied reviewer feedback"),
        "{:?}",
        host.logs
    );

    // With one feature the default already names only that one.
    let mut one = brief();
    one["features"] = json!(["leak-proof lid"]);
    let b = Brief::from_payload(&one.to_string()).unwrap();
    let (default, short) = (
        write_copy(&b, 1, None).0,
        write_copy(&b, 2, Some("shorter")).0,
    );
    assert_eq!(short.tagline, "Acme Travel Mug.");
    assert!(short.tagline.len() < default.tagline.len());
}

#[test]
fn audience_feedback_names_the_audience() {
    let plain = copy_of(None);
    assert!(!plain.tagline.contains("busy commuters"));
    let copy = copy_of(Some("Say who the audience is"));
    assert_eq!(
        copy.tagline,
        "Acme Travel Mug, made for busy commuters: keeps coffee hot for 6 hours, leak-proof lid, and more."
    );
    assert_eq!(
        copy.email.subject,
        "Acme Travel Mug, made for busy commuters"
    );
    assert_eq!(
        copy.addressed_feedback.as_deref(),
        Some("Say who the audience is")
    );

    let both = copy_of(Some("shorter, and mention the target audience"));
    assert_eq!(both.tagline, "Acme Travel Mug, made for busy commuters.");
}

#[test]
fn other_feedback_rules() {
    let longer = copy_of(Some("Longer please, with all features"));
    assert_eq!(
        longer.tagline,
        "Acme Travel Mug brings you keeps coffee hot for 6 hours, leak-proof lid and dishwasher safe."
    );
    let formal = copy_of(Some("Make it more formal"));
    assert!(
        formal.email.body.starts_with("Dear customer,")
            && formal.email.body.contains("Kind regards,")
    );
    assert!(!formal.social[2].text.contains('✨'));
    let playful = copy_of(Some("more playful!"));
    assert!(playful.tagline.ends_with('!'));
    assert!(playful.social[0].text.starts_with("🎉 "));
    assert_eq!(playful.email.subject, "Say hello to Acme Travel Mug!");
}

#[test]
fn unmatched_feedback_still_changes_the_copy() {
    let (out, host) = run_ok(&task(&brief(), 2, Some("I don't love it")));
    assert_eq!(
        out["tagline"],
        "Meet Acme Travel Mug: keeps coffee hot for 6 hours, leak-proof lid, and more."
    );
    assert_eq!(out["email"]["subject"], "Meet Acme Travel Mug");
    assert_eq!(out["addressed_feedback"], "I don't love it");
    assert!(
        host.logged(Level::Warn, "matched no rule"),
        "{:?}",
        host.logs
    );
}

#[test]
fn any_feedback_gives_different_copy() {
    let plain = copy_of(None);
    for feedback in [
        "shorter",
        "audience",
        "longer",
        "formal",
        "playful",
        "hmm",
        "shorter and formal",
    ] {
        let copy = copy_of(Some(feedback));
        assert_eq!(copy.addressed_feedback.as_deref(), Some(feedback));
        assert!(
            (&copy.tagline, &copy.email, &copy.social)
                != (&plain.tagline, &plain.email, &plain.social),
            "feedback {feedback:?} left the copy unchanged"
        );
    }
}

#[test]
fn blank_feedback_counts_as_none() {
    let (out, host) = run_ok(&task(&brief(), 1, Some("   ")));
    assert_eq!(out["addressed_feedback"], Value::Null);
    assert_eq!(out["tagline"], copy_of(None).tagline);
    assert_eq!(out["revision"], 1);
    assert!(host.logged(Level::Warn, "blank"));
}

#[test]
fn posts_are_cut_to_platform_limits() {
    let mut b = brief();
    b["name"] = json!("Ünïcødé ".repeat(40).trim());
    b["features"] = json!(vec!["a very long feature description ✓ ".repeat(10); 12]);
    let (out, host) = run_ok(&task(&b, 1, None));
    let social = out["social"].as_array().unwrap();
    for (post, (platform, limit)) in social.iter().zip(LIMITS) {
        let text = post["text"].as_str().unwrap();
        assert!(
            text.chars().count() <= limit,
            "{platform}: {}",
            text.chars().count()
        );
        assert!(text.ends_with('…'), "{platform} was not marked as cut");
        assert!(
            host.logged(Level::Warn, &format!("the {platform} post was cut")),
            "{:?}",
            host.logs
        );
    }
}

#[test]
fn truncation_keeps_characters_whole() {
    assert_eq!(
        kit::truncate_chars("short", 10),
        ("short".to_string(), false)
    );
    assert_eq!(
        kit::truncate_chars("exactly10!", 10),
        ("exactly10!".to_string(), false)
    );
    assert_eq!(
        kit::truncate_chars("ééééééé", 4),
        ("ééé…".to_string(), true)
    );
    assert_eq!(
        kit::truncate_chars("🎉🎉🎉🎉", 3),
        ("🎉🎉…".to_string(), true)
    );
    assert_eq!(
        kit::truncate_chars("two words here", 5),
        ("two…".to_string(), true)
    );
}

#[test]
fn bad_payloads_are_permanent_failures_naming_the_field() {
    assert!(permanent("hello").starts_with("payload is not valid JSON"));
    assert_eq!(
        permanent("null"),
        "payload must be a JSON object (got null)"
    );
    for field in ["name", "audience", "features"] {
        let mut b = brief();
        b.as_object_mut().unwrap().remove(field);
        assert!(
            permanent(&b.to_string()).starts_with(&format!("payload field \"{field}\" is missing"))
        );
    }
    let cases = [
        (
            "name",
            json!(""),
            "payload field \"name\" must be a non-empty string (got an empty string)",
        ),
        (
            "audience",
            json!(["x"]),
            "payload field \"audience\" must be a non-empty string (got a list)",
        ),
        (
            "features",
            json!([]),
            "payload field \"features\" must be a non-empty list of non-empty strings (got an empty list)",
        ),
        (
            "features",
            json!({"a": 1}),
            "payload field \"features\" must be a non-empty list of non-empty strings (got an object)",
        ),
        (
            "features",
            json!(["ok", ""]),
            "payload field \"features[1]\" must be a non-empty string (got an empty string)",
        ),
    ];
    for (field, value, expected) in cases {
        let mut b = brief();
        b[field] = value;
        assert_eq!(permanent(&b.to_string()), expected);
    }
}

fn with_model(answer: Result<String, kit::ModelRefusal>) -> Recorder {
    Recorder {
        model_answers: [answer].into(),
        ..Recorder::default()
    }
}

#[test]
fn a_granted_model_writes_the_tagline_and_the_email() {
    let answer = json!({"tagline": "Hot coffee, no spills.", "subject": "Meet your mug", "body": "Hello commuters!"});
    let mut host = with_model(Ok(answer.to_string()));
    let done = run(&task(&brief(), 1, None), &mut host).unwrap();
    let out: Value = serde_json::from_str(&done.output).unwrap();
    assert_eq!(out["tagline"], "Hot coffee, no spills.");
    assert_eq!(out["email"]["subject"], "Meet your mug");
    assert_eq!(out["email"]["body"], "Hello commuters!");
    assert_eq!(out["written_by"], "model:copy");
    let (alias, prompt) = &host.prompts[0];
    assert_eq!(alias, COPY_MODEL);
    assert!(
        prompt.contains("Acme Travel Mug") && prompt.contains("- leak-proof lid"),
        "{prompt}"
    );
    assert!(!prompt.contains("reviewer"), "{prompt}");
}

#[test]
fn the_reviewers_note_goes_into_the_revision_prompt() {
    let mut host = with_model(Err(kit::ModelRefusal::NotAvailable("none".into())));
    run(&task(&brief(), 1, Some("mention the audience")), &mut host).unwrap();
    assert!(
        host.prompts[0]
            .1
            .contains("address it: mention the audience"),
        "{:?}",
        host.prompts
    );
    assert!(host.logged(Level::Info, "using the template"));
}

#[test]
fn an_answer_that_is_not_the_json_asked_for_keeps_the_template() {
    let mut host = with_model(Ok("Sure! Here is some copy.".into()));
    let done = run(&task(&brief(), 1, None), &mut host).unwrap();
    let out: Value = serde_json::from_str(&done.output).unwrap();
    assert_eq!(out["written_by"], "template");
    assert!(host.logged(Level::Warn, "not the JSON asked for"));
}

#[test]
fn a_failed_model_call_is_a_retryable_failure() {
    let mut host = with_model(Err(kit::ModelRefusal::Failed("unavailable: 503".into())));
    match run(&task(&brief(), 1, None), &mut host) {
        Err(Failure::Retryable(message)) => assert!(message.contains("503"), "{message}"),
        other => panic!("expected a retryable failure, got {other:?}"),
    }
}

#[test]
fn the_published_copy_is_recorded_per_product() {
    let mut host = Recorder::default();
    run(&task(&brief(), 1, None), &mut host).unwrap();
    let (key, value, if_version) = &host.writes[0];
    assert_eq!(key, "published/Acme Travel Mug");
    assert_eq!(*if_version, None);
    let published: Value = serde_json::from_str(value).unwrap();
    assert_eq!(published["revision"], 1);
    assert_eq!(published["written_by"], "template");
}
