//! The streaming state the call-reading formats (`hermes`, `llama3_json`,
//! `mistral` and the bare lists of `constrained`) share: each keeps its own
//! mode machine for the text around calls, and this for the calls' text.
//! `pythonic` parses the whole list again on each delta and needs none of it.

use super::json_call::CallReader;
use super::{drain_reader, feed_str, push_content, Fed, ToolEvent};
use crate::openai::reasoning::partial_tag_len;

#[derive(Default)]
pub(crate) struct StreamState {
    /// Text received and not yet consumed.
    pub buf: String,
    /// The raw text of the calls so far, given back as content if the reply
    /// turns out malformed before any call went out.
    pub held: String,
    /// The index the next call gets.
    pub index: usize,
    /// A call's name went out: from then on nothing can be taken back.
    pub released: bool,
    /// The reply was found malformed (the whole reply is then content).
    pub failed: bool,
}

impl StreamState {
    /// Sends the content before `tag` and consumes the tag, which starts the
    /// held text; false (the tag not seen yet) once only what may be the
    /// start of the tag is left in the buffer.
    pub fn content_until(&mut self, tag: &str, out: &mut Vec<ToolEvent>) -> bool {
        match self.buf.find(tag) {
            Some(at) => {
                push_content(out, &self.buf[..at]);
                self.buf.drain(..at + tag.len());
                self.held = tag.to_string();
                true
            }
            None => {
                let keep = partial_tag_len(&self.buf, tag);
                let cut = self.buf.len() - keep;
                push_content(out, &self.buf[..cut]);
                self.buf.drain(..cut);
                false
            }
        }
    }

    /// Feeds the buffer to the call being read and sends what it has ready.
    /// What it consumed moves to the held text; on `Done` the next call's
    /// index is taken, on `Error` the buffer is left as it was.
    pub fn feed(&mut self, reader: &mut CallReader, out: &mut Vec<ToolEvent>) -> Fed {
        let fed = feed_str(reader, &self.buf);
        self.released |= drain_reader(reader, self.index, out);
        match fed {
            Fed::NeedMore => self.hold_rest(),
            Fed::Done(n) => {
                self.held.extend(self.buf.drain(..n));
                self.index += 1;
            }
            Fed::Error => {}
        }
        fed
    }

    /// Moves the whole buffer to the held text.
    pub fn hold_rest(&mut self) {
        self.held.push_str(&self.buf);
        self.buf.clear();
    }

    /// Marks the reply malformed. Before any call went out, the held text and
    /// the buffer go out as content and this returns false: the rest of the
    /// reply is plain content. Once a call is out it returns true and leaves
    /// the buffer to the format, which drops or skips what follows.
    pub fn fail(&mut self, out: &mut Vec<ToolEvent>) -> bool {
        self.failed = true;
        if self.released {
            return true;
        }
        push_content(out, &self.held);
        push_content(out, &self.buf);
        self.held.clear();
        self.buf.clear();
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_stops_at_the_tag_and_keeps_a_partial_one() {
        let mut s = StreamState {
            buf: "hi <to".into(),
            ..Default::default()
        };
        let mut out = Vec::new();
        assert!(!s.content_until("<tool>", &mut out));
        assert_eq!(out, [ToolEvent::Content("hi ".into())]);
        assert_eq!(s.buf, "<to");
        s.buf.push_str("ol>{");
        assert!(s.content_until("<tool>", &mut out));
        assert_eq!((s.buf.as_str(), s.held.as_str()), ("{", "<tool>"));
    }

    #[test]
    fn a_failure_gives_back_held_text_only_before_a_call_went_out() {
        let mut s = StreamState {
            buf: "b".into(),
            held: "a".into(),
            ..Default::default()
        };
        let mut out = Vec::new();
        assert!(!s.fail(&mut out));
        assert!(s.failed && s.buf.is_empty() && s.held.is_empty());
        assert_eq!(out, [ToolEvent::Content("ab".into())]);

        let mut s = StreamState {
            buf: "b".into(),
            held: "a".into(),
            released: true,
            ..Default::default()
        };
        let mut out = Vec::new();
        assert!(s.fail(&mut out));
        assert!(out.is_empty() && s.buf == "b");
    }
}
