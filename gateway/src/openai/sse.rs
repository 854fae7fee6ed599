//! Server-sent events as OpenAI streams them: `data: {json}` per chunk,
//! ending with `data: [DONE]`.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use serde::Serialize;

use super::fanout::MergedStream;
use crate::engine::RequestOutput;

pub fn json_event<T: Serialize>(value: &T) -> Event {
    match serde_json::to_string(value) {
        Ok(s) => Event::default().data(s),
        // Our own types always serialize; say so in-band rather than panic.
        Err(e) => Event::default().data(format!(
            "{{\"error\": {{\"message\": \"serialization failed: {e}\", \"type\": \"InternalServerError\", \"param\": null, \"code\": 500}}}}"
        )),
    }
}

pub fn done_event() -> Event {
    Event::default().data("[DONE]")
}

/// Turns engine outputs into SSE events through a per-request encoder.
pub trait ChunkEncoder: Send + 'static {
    /// Events to send before any output (chat's role chunks).
    fn start(&mut self) -> Vec<Event>;
    /// Events for one output of choice `idx` (possibly none).
    fn on_output(&mut self, idx: usize, out: RequestOutput) -> Vec<Event>;
    /// Events after every choice finished (the usage chunk), before `[DONE]`.
    fn finish(&mut self) -> Vec<Event>;
}

/// The SSE response. Dropping it (a client that went away) drops the
/// merged engine streams, which aborts the requests.
pub fn stream_response<E: ChunkEncoder>(mut encoder: E, merged: MergedStream) -> Response {
    let first = encoder.start();
    let body = stream::unfold(Some((merged, encoder)), |state| async move {
        let (mut merged, mut encoder) = state?;
        loop {
            match merged.next().await {
                Some((idx, out)) => {
                    let events = encoder.on_output(idx, out);
                    if !events.is_empty() {
                        return Some((events, Some((merged, encoder))));
                    }
                }
                None => {
                    let mut events = encoder.finish();
                    events.push(done_event());
                    return Some((events, None));
                }
            }
        }
    });
    let events = stream::iter(first)
        .chain(body.flat_map(stream::iter))
        .map(Ok::<_, Infallible>);
    sse(events)
}

fn sse(events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(events).into_response()
}
