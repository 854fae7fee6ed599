//! Shared checks for the parsers' fixtures.

use rand::{Rng, SeedableRng};

use super::{assemble, ParsedCall, ToolCallParser, ToolEvent, ToolStream};

/// (model text, expected (name, arguments) calls, expected content).
pub type Fixture<'a> = (&'a str, &'a [(&'a str, &'a str)], Option<&'a str>);

/// Cuts `text` into pieces of random byte sizes in 1..=max (moved forward to
/// char boundaries).
pub fn random_chunks(text: &str, rng: &mut impl Rng, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < text.len() {
        let mut end = (at + rng.random_range(1..=max)).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push(text[at..end].to_string());
        at = end;
    }
    out
}

pub fn fixed_chunks(text: &str, size: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < text.len() {
        let mut end = (at + size).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push(text[at..end].to_string());
        at = end;
    }
    out
}

pub fn streamed(mut stream: ToolStream, pieces: &[String]) -> (String, Vec<ParsedCall>) {
    let mut events = Vec::new();
    for p in pieces {
        events.extend(stream.push(p));
    }
    events.extend(stream.finish());
    check_shape(&events);
    assemble(events)
}

/// vLLM's delta rules: a call's name comes whole, before its arguments;
/// calls are numbered in order.
pub fn check_shape(events: &[ToolEvent]) {
    let mut started = 0;
    for e in events {
        match e {
            ToolEvent::Start { index, name } => {
                assert_eq!(*index, started, "{events:?}");
                assert!(!name.is_empty());
                started += 1;
            }
            ToolEvent::Arguments { index, fragment } => {
                assert!(*index < started, "arguments before the name: {events:?}");
                assert!(!fragment.is_empty());
            }
            ToolEvent::Content(c) => assert!(!c.is_empty()),
        }
    }
}

/// Whole-reply results equal the fixtures; streaming in random chunk sizes
/// (and in every fixed size) reassembles to the whole-reply result, except
/// for the fixtures listed in `diverging` (broken after a call went out).
pub fn check_fixtures_with(
    stream: impl Fn() -> ToolStream,
    fixtures: &[Fixture],
    diverging: &[usize],
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (i, (text, calls, content)) in fixtures.iter().enumerate() {
        let got = stream().extract(text);
        let want: Vec<ParsedCall> = calls
            .iter()
            .map(|(n, a)| ParsedCall {
                name: n.to_string(),
                arguments: a.to_string(),
            })
            .collect();
        assert_eq!(got.calls, want, "calls of fixture {i}: {text:?}");
        assert_eq!(
            got.content.as_deref(),
            *content,
            "content of fixture {i}: {text:?}"
        );
        if diverging.contains(&i) {
            continue;
        }
        let whole = (got.content.clone().unwrap_or_default(), got.calls.clone());
        let mut cuts: Vec<Vec<String>> = (1..=text.len().min(24))
            .map(|size| fixed_chunks(text, size))
            .collect();
        for _ in 0..200 {
            let max = rng.random_range(1..=8);
            cuts.push(random_chunks(text, &mut rng, max));
        }
        for pieces in cuts {
            assert_eq!(pieces.concat(), *text);
            assert_eq!(
                streamed(stream(), &pieces),
                whole,
                "fixture {i} in {pieces:?}"
            );
        }
    }
}

pub fn check_fixtures(parser: ToolCallParser, fixtures: &[Fixture], diverging: &[usize]) {
    check_fixtures_with(|| parser.stream(), fixtures, diverging)
}
