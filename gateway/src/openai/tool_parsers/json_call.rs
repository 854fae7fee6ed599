//! The JSON pieces every JSON-based format shares: a re-serializer that
//! writes a value the way vLLM's `json.dumps(json.loads(x), ensure_ascii=False)`
//! does, one character at a time (so streamed argument fragments always
//! concatenate to the non-streamed arguments), and a reader for one call
//! object `{"name": ..., "arguments": ...}` built on it.
//!
//! One difference from Python remains: an object that repeats a key keeps
//! every occurrence here, where `json.loads` keeps only the last value (a
//! stream cannot know a later duplicate is coming).

/// Python's `repr(float)`: shortest round-trip digits, positional between
/// 1e-4 and 1e16, otherwise `d.ddde+XX` with at least two exponent digits.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. "-1.25e-7".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let decpt = exp + 1;
    if (-3..=16).contains(&decpt) {
        let body = if decpt <= 0 {
            format!("0.{}{digits}", "0".repeat((-decpt) as usize))
        } else if decpt as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(decpt as usize - digits.len()))
        } else {
            let (a, b) = digits.split_at(decpt as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

/// Appends `c` as it appears inside a json.dumps string (ensure_ascii=False).
pub fn push_json_char(out: &mut String, c: char) {
    match c {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{8}' => out.push_str("\\b"),
        '\u{c}' => out.push_str("\\f"),
        c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
        c => out.push(c),
    }
}

pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        push_json_char(&mut out, c);
    }
    out.push('"');
    out
}

/// A JSON number token as Python re-prints it: integers keep their digits
/// (Python ints are unbounded), anything with a fraction or exponent is a
/// float. None when the token is not a JSON number.
pub fn canonical_number(tok: &str) -> Option<String> {
    let b = tok.as_bytes();
    let mut i = 0;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    let int_start = i;
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
        }
        _ => return None,
    }
    let int_end = i;
    let mut float = false;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let s = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == s {
            return None;
        }
        float = true;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let s = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == s {
            return None;
        }
        float = true;
    }
    if i != b.len() {
        return None;
    }
    if float {
        return tok.parse::<f64>().ok().map(py_float_repr);
    }
    let digits = &tok[int_start..int_end];
    Some(if digits == "0" {
        "0".into()
    } else {
        tok.to_string()
    })
}

/// What [`JsonCanon::feed`] did with a character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Consumed,
    /// The value was already complete; the character belongs to what follows.
    Done,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjSt {
    KeyOrEnd,
    Key,
    InKey,
    Colon,
    Value,
    CommaOrEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrSt {
    ValueOrEnd,
    Value,
    CommaOrEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    Obj(ObjSt),
    Arr(ArrSt),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Scalar {
    None,
    Str {
        escape: Option<String>,
        high_surrogate: Option<u32>,
    },
    Num(String),
    Lit(String),
}

/// One JSON value, re-serialized as it is fed. `out` only ever grows by text
/// that every valid completion shares, so it can be streamed as it comes.
#[derive(Debug, Clone)]
pub struct JsonCanon {
    stack: Vec<Frame>,
    scalar: Scalar,
    started: bool,
    done: bool,
    pub out: String,
}

impl Default for JsonCanon {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonCanon {
    pub fn new() -> Self {
        Self {
            stack: Vec::new(),
            scalar: Scalar::None,
            started: false,
            done: false,
            out: String::new(),
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The input ended: completes a bare top-level number or literal.
    pub fn finish(&mut self) -> bool {
        if !self.done && self.stack.is_empty() && self.feed(' ') == Step::Error {
            return false;
        }
        self.done
    }

    pub fn feed(&mut self, c: char) -> Step {
        if self.done {
            return Step::Done;
        }
        match std::mem::replace(&mut self.scalar, Scalar::None) {
            Scalar::None => self.structural(c),
            Scalar::Str {
                escape,
                high_surrogate,
            } => self.string_char(c, escape, high_surrogate),
            Scalar::Num(mut tok) => {
                if c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-') {
                    tok.push(c);
                    self.scalar = Scalar::Num(tok);
                    return Step::Consumed;
                }
                let Some(n) = canonical_number(&tok) else {
                    return Step::Error;
                };
                self.out.push_str(&n);
                self.value_done();
                if self.done {
                    return Step::Done;
                }
                self.structural(c)
            }
            Scalar::Lit(mut tok) => {
                tok.push(c);
                let lit = ["true", "false", "null"]
                    .into_iter()
                    .find(|l| l.starts_with(&tok));
                match lit {
                    Some(l) if l.len() == tok.len() => {
                        self.out.push_str(l);
                        self.value_done();
                        Step::Consumed
                    }
                    Some(_) => {
                        self.scalar = Scalar::Lit(tok);
                        Step::Consumed
                    }
                    None => Step::Error,
                }
            }
        }
    }

    fn string_char(&mut self, c: char, escape: Option<String>, high: Option<u32>) -> Step {
        let unit = match escape {
            None => match c {
                '"' if high.is_none() => {
                    self.out.push('"');
                    self.value_done();
                    return Step::Consumed;
                }
                '\\' => {
                    self.scalar = Scalar::Str {
                        escape: Some(String::new()),
                        high_surrogate: high,
                    };
                    return Step::Consumed;
                }
                // A lone surrogate has no UTF-8 form; json.loads keeps it but
                // the reply could not carry it either.
                _ if high.is_some() => return Step::Error,
                c if (c as u32) < 0x20 => return Step::Error,
                c => c as u32,
            },
            Some(mut esc) => {
                esc.push(c);
                let simple = match esc.as_str() {
                    "\"" => Some('"'),
                    "\\" => Some('\\'),
                    "/" => Some('/'),
                    "b" => Some('\u{8}'),
                    "f" => Some('\u{c}'),
                    "n" => Some('\n'),
                    "r" => Some('\r'),
                    "t" => Some('\t'),
                    _ => None,
                };
                match simple {
                    Some(_) if high.is_some() => return Step::Error,
                    Some(ch) => ch as u32,
                    None if esc.starts_with('u')
                        && esc[1..].chars().all(|h| h.is_ascii_hexdigit()) =>
                    {
                        if esc.len() < 5 {
                            self.scalar = Scalar::Str {
                                escape: Some(esc),
                                high_surrogate: high,
                            };
                            return Step::Consumed;
                        }
                        u32::from_str_radix(&esc[1..], 16).unwrap_or(0)
                    }
                    None => return Step::Error,
                }
            }
        };
        let code = match (high, unit) {
            (None, 0xD800..=0xDBFF) => {
                self.scalar = Scalar::Str {
                    escape: None,
                    high_surrogate: Some(unit),
                };
                return Step::Consumed;
            }
            (None, 0xDC00..=0xDFFF) => return Step::Error,
            (None, u) => u,
            (Some(h), 0xDC00..=0xDFFF) => 0x10000 + ((h - 0xD800) << 10) + (unit - 0xDC00),
            (Some(_), _) => return Step::Error,
        };
        let Some(ch) = char::from_u32(code) else {
            return Step::Error;
        };
        push_json_char(&mut self.out, ch);
        self.scalar = Scalar::Str {
            escape: None,
            high_surrogate: None,
        };
        Step::Consumed
    }

    fn start_value(&mut self, c: char) -> Step {
        self.started = true;
        match c {
            '{' => {
                self.out.push('{');
                self.stack.push(Frame::Obj(ObjSt::KeyOrEnd));
            }
            '[' => {
                self.out.push('[');
                self.stack.push(Frame::Arr(ArrSt::ValueOrEnd));
            }
            '"' => {
                self.out.push('"');
                self.scalar = Scalar::Str {
                    escape: None,
                    high_surrogate: None,
                };
            }
            '-' | '0'..='9' => self.scalar = Scalar::Num(c.to_string()),
            't' | 'f' | 'n' => self.scalar = Scalar::Lit(c.to_string()),
            _ => return Step::Error,
        }
        Step::Consumed
    }

    fn structural(&mut self, c: char) -> Step {
        if matches!(c, ' ' | '\t' | '\n' | '\r') {
            return Step::Consumed;
        }
        let Some(top) = self.stack.last_mut() else {
            return if self.started {
                Step::Error
            } else {
                self.start_value(c)
            };
        };
        match *top {
            Frame::Obj(ObjSt::KeyOrEnd | ObjSt::CommaOrEnd) if c == '}' => {
                self.out.push('}');
                self.stack.pop();
                self.value_done();
            }
            Frame::Obj(ObjSt::KeyOrEnd | ObjSt::Key) if c == '"' => {
                *top = Frame::Obj(ObjSt::InKey);
                self.out.push('"');
                self.scalar = Scalar::Str {
                    escape: None,
                    high_surrogate: None,
                };
            }
            Frame::Obj(ObjSt::Colon) if c == ':' => {
                *top = Frame::Obj(ObjSt::Value);
                self.out.push_str(": ");
            }
            Frame::Obj(ObjSt::CommaOrEnd) if c == ',' => {
                *top = Frame::Obj(ObjSt::Key);
                self.out.push_str(", ");
            }
            Frame::Obj(ObjSt::Value) => return self.start_value(c),
            Frame::Arr(ArrSt::ValueOrEnd | ArrSt::CommaOrEnd) if c == ']' => {
                self.out.push(']');
                self.stack.pop();
                self.value_done();
            }
            Frame::Arr(ArrSt::CommaOrEnd) if c == ',' => {
                *top = Frame::Arr(ArrSt::Value);
                self.out.push_str(", ");
            }
            Frame::Arr(ArrSt::ValueOrEnd | ArrSt::Value) => {
                *top = Frame::Arr(ArrSt::CommaOrEnd);
                return self.start_value(c);
            }
            _ => return Step::Error,
        }
        Step::Consumed
    }

    fn value_done(&mut self) {
        match self.stack.last_mut() {
            None => self.done = true,
            Some(Frame::Obj(st)) => {
                *st = if *st == ObjSt::InKey {
                    ObjSt::Colon
                } else {
                    ObjSt::CommaOrEnd
                }
            }
            // Arrays moved to CommaOrEnd when the value started.
            Some(Frame::Arr(_)) => {}
        }
    }
}

/// Re-serializes a whole JSON text; None when it is not exactly one value.
pub fn canonical_json(text: &str) -> Option<String> {
    let mut c = JsonCanon::new();
    for ch in text.chars() {
        match c.feed(ch) {
            Step::Consumed => {}
            Step::Done if ch.is_whitespace() => {}
            _ => return None,
        }
    }
    c.finish().then_some(c.out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallSt {
    Open,
    KeyOrEnd,
    Key,
    InKey,
    Colon,
    Value,
    CommaOrEnd,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Name,
    Args,
    Other,
}

/// Reads one `{"name": "f", "<args key>": {...}}` object character by
/// character. The name is released once its string closes; argument text
/// streams as it is re-serialized (held back until the name is known when a
/// model writes the arguments first).
#[derive(Debug, Clone)]
pub struct CallReader {
    args_keys: &'static [&'static str],
    st: CallSt,
    value: JsonCanon,
    role: Role,
    name: Option<String>,
    name_released: bool,
    args_seen: bool,
    /// Argument text not yet taken by the caller.
    args_pending: String,
}

impl CallReader {
    pub fn new(args_keys: &'static [&'static str]) -> Self {
        Self {
            args_keys,
            st: CallSt::Open,
            value: JsonCanon::new(),
            role: Role::Other,
            name: None,
            name_released: false,
            args_seen: false,
            args_pending: String::new(),
        }
    }

    pub fn is_done(&self) -> bool {
        self.st == CallSt::Done
    }

    /// Whether the caller has been given the name (the call is public).
    pub fn released(&self) -> bool {
        self.name_released
    }

    /// The name, the first time it can be released.
    pub fn take_name(&mut self) -> Option<String> {
        if self.name_released {
            return None;
        }
        let name = self.name.clone()?;
        self.name_released = true;
        Some(name)
    }

    /// Argument text re-serialized since the last call; empty until the name
    /// is released.
    pub fn take_args(&mut self) -> String {
        if !self.name_released {
            return String::new();
        }
        std::mem::take(&mut self.args_pending)
    }

    fn drain_value(&mut self) {
        if self.role == Role::Args {
            self.args_pending.push_str(&self.value.out);
        }
        self.value.out.clear();
    }

    pub fn feed(&mut self, c: char) -> Step {
        let ws = matches!(c, ' ' | '\t' | '\n' | '\r');
        match self.st {
            CallSt::Done => Step::Done,
            CallSt::Open | CallSt::KeyOrEnd | CallSt::Key | CallSt::Colon | CallSt::CommaOrEnd
                if ws =>
            {
                Step::Consumed
            }
            CallSt::Open if c == '{' => {
                self.st = CallSt::KeyOrEnd;
                Step::Consumed
            }
            CallSt::KeyOrEnd | CallSt::Key if c == '"' => {
                self.value = JsonCanon::new();
                self.value.feed(c);
                self.st = CallSt::InKey;
                Step::Consumed
            }
            CallSt::KeyOrEnd | CallSt::CommaOrEnd if c == '}' => {
                if self.name.is_none() || !self.args_seen {
                    return Step::Error;
                }
                self.st = CallSt::Done;
                Step::Consumed
            }
            CallSt::CommaOrEnd if c == ',' => {
                self.st = CallSt::Key;
                Step::Consumed
            }
            CallSt::InKey => {
                if self.value.feed(c) != Step::Consumed {
                    return Step::Error;
                }
                if self.value.is_done() {
                    let Ok(key) = serde_json::from_str::<String>(&self.value.out) else {
                        return Step::Error;
                    };
                    self.role = if key == "name" {
                        Role::Name
                    } else if self.args_keys.contains(&key.as_str()) {
                        Role::Args
                    } else {
                        Role::Other
                    };
                    let repeated = match self.role {
                        Role::Name => self.name.is_some(),
                        Role::Args => self.args_seen,
                        Role::Other => false,
                    };
                    if repeated {
                        return Step::Error;
                    }
                    self.args_seen |= self.role == Role::Args;
                    self.value = JsonCanon::new();
                    self.st = CallSt::Colon;
                }
                Step::Consumed
            }
            CallSt::Colon if c == ':' => {
                self.st = CallSt::Value;
                Step::Consumed
            }
            CallSt::Value => match self.value.feed(c) {
                Step::Error => Step::Error,
                step => {
                    if self.drain_value_or_name().is_err() {
                        return Step::Error;
                    }
                    if step == Step::Done {
                        self.st = CallSt::CommaOrEnd;
                        return self.feed(c);
                    }
                    Step::Consumed
                }
            },
            _ => Step::Error,
        }
    }
}

impl CallReader {
    /// After a value character: collects argument text, or the name once its
    /// string closed. Err when the name is not a string.
    fn drain_value_or_name(&mut self) -> Result<(), ()> {
        match self.role {
            Role::Name if self.value.is_done() => {
                let name = serde_json::from_str::<String>(&self.value.out).map_err(|_| ())?;
                self.name = Some(name);
                self.value.out.clear();
            }
            Role::Name => {
                if !self.value.out.is_empty() && !self.value.out.starts_with('"') {
                    return Err(());
                }
            }
            _ => self.drain_value(),
        }
        if self.value.is_done() && self.st == CallSt::Value {
            self.st = CallSt::CommaOrEnd;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values printed by CPython 3: json.dumps(json.loads(x), ensure_ascii=False).
    #[test]
    fn numbers_as_python_prints_them() {
        let cases = [
            ("1e16", "1e+16"),
            ("1e15", "1000000000000000.0"),
            ("0.0001", "0.0001"),
            ("0.00001", "1e-05"),
            ("1.5", "1.5"),
            ("-0.0", "-0.0"),
            (
                "123456789012345678901234567890",
                "123456789012345678901234567890",
            ),
            ("1E400", "Infinity"),
            ("2.5e-7", "2.5e-07"),
            ("100.0", "100.0"),
            ("3.14159", "3.14159"),
            ("1e22", "1e+22"),
            ("-1.25e-10", "-1.25e-10"),
            ("5e-324", "5e-324"),
            ("0.1", "0.1"),
            ("-0", "0"),
        ];
        for (tok, want) in cases {
            assert_eq!(canonical_number(tok).as_deref(), Some(want), "{tok}");
            assert_eq!(canonical_json(tok).as_deref(), Some(want), "{tok}");
        }
        for bad in ["01", "1.", ".5", "-", "1e", "+1", "1e+"] {
            assert_eq!(canonical_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn documents_as_python_prints_them() {
        let cases = [
            (
                r#"{"a" : [1,2 , {"b":null}],"c":"\u00e9\ud83d\ude00\n\t\"\\\/\u0001\u007f"}"#,
                "{\"a\": [1, 2, {\"b\": null}], \"c\": \"é😀\\n\\t\\\"\\\\/\\u0001\u{7f}\"}",
            ),
            ("[]", "[]"),
            ("{}", "{}"),
            (
                r#"[{}, [], "", true, false]"#,
                r#"[{}, [], "", true, false]"#,
            ),
            (" \n{ \"x\" :\t1 } ", r#"{"x": 1}"#),
        ];
        for (doc, want) in cases {
            assert_eq!(canonical_json(doc).as_deref(), Some(want), "{doc}");
        }
        for bad in [
            "{",
            "{\"a\"}",
            "[1,]",
            "{\"a\":1,}",
            "tru",
            "nul",
            "\"\\x\"",
            "\"\u{1}\"",
            "\"\\ud83d\"",
            "{} {}",
            "[1 2]",
            "{1: 2}",
        ] {
            assert_eq!(canonical_json(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn output_only_grows_by_settled_text() {
        let doc = r#"{"q": "ab", "n": [12, -3.50], "t": true}"#;
        let whole = canonical_json(doc).unwrap();
        let mut c = JsonCanon::new();
        for ch in doc.chars() {
            c.feed(ch);
            assert!(whole.starts_with(&c.out), "{:?} not a prefix", c.out);
        }
        assert!(c.is_done());
        assert_eq!(c.out, whole);
    }

    #[test]
    fn call_reader_releases_name_then_arguments() {
        let mut r = CallReader::new(&["arguments"]);
        for ch in r#"{"name": "f", "argu"#.chars() {
            assert_eq!(r.feed(ch), Step::Consumed);
        }
        assert_eq!(r.take_name().as_deref(), Some("f"));
        for ch in r#"ments": {"a": "#.chars() {
            r.feed(ch);
        }
        assert_eq!(r.take_args(), r#"{"a": "#);
        for ch in "1}}".chars() {
            r.feed(ch);
        }
        assert!(r.is_done());
        assert_eq!(r.take_args(), "1}");
        // Arguments first: held until the name is known.
        let mut r = CallReader::new(&["arguments"]);
        for ch in r#"{"arguments": {"a": 1}, "name": "g"}"#.chars() {
            assert_eq!(r.feed(ch), Step::Consumed);
            if !r.released() {
                assert_eq!(r.take_args(), "");
            }
        }
        assert_eq!(r.take_name().as_deref(), Some("g"));
        assert_eq!(r.take_args(), r#"{"a": 1}"#);
    }
}
