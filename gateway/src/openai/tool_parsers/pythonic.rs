//! `pythonic` (Llama 3.2/4, ToolACE): the whole reply is a Python list of
//! calls with keyword arguments, `[get_weather(city='Paris'), f(x=[1, 2])]`.
//! Argument values are Python literals (strings, numbers, True/False/None,
//! lists, dicts), returned as the JSON json.dumps writes. Anything else is
//! content; with calls, content is null.
//!
//! While streaming, the list so far is parsed again on each delta (replies
//! of this kind are short); an argument goes out once its value is complete.

use super::json_call::{json_string, py_float_repr};
use super::{is_ws, push_args, push_content, FormatStream, ToolEvent};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct PCall {
    name: String,
    /// The name is whole and the call looks like one (a keyword argument
    /// or `)` follows the `(`).
    named: bool,
    args: Vec<(String, String)>,
    closed: bool,
}

impl PCall {
    /// The arguments text known so far; later text only extends it.
    fn arguments(&self) -> String {
        let mut s = String::from("{");
        for (i, (k, v)) in self.args.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            s.push_str(&json_string(k));
            s.push_str(": ");
            s.push_str(v);
        }
        if self.closed {
            s.push('}');
        }
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PErr {
    /// The text ends before the list does.
    Incomplete,
    Invalid,
}

type PResult<T> = Result<T, PErr>;

struct Parser<'a> {
    s: &'a str,
    pos: usize,
    calls: Vec<PCall>,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> PResult<char> {
        self.s[self.pos..].chars().next().ok_or(PErr::Incomplete)
    }

    fn bump(&mut self) -> PResult<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Ok(c)
    }

    fn ws(&mut self) {
        while let Ok(c) = self.peek() {
            if !is_ws(c) {
                break;
            }
            self.pos += c.len_utf8();
        }
    }

    fn expect(&mut self, c: char) -> PResult<()> {
        if self.bump()? == c {
            Ok(())
        } else {
            Err(PErr::Invalid)
        }
    }

    /// An identifier; at the end of the text it may still be growing.
    fn ident(&mut self) -> PResult<String> {
        let start = self.pos;
        match self.peek()? {
            c if c.is_alphabetic() || c == '_' => {}
            _ => return Err(PErr::Invalid),
        }
        while let Ok(c) = self.peek() {
            if !(c.is_alphanumeric() || c == '_') {
                return Ok(self.s[start..self.pos].to_string());
            }
            self.pos += c.len_utf8();
        }
        Err(PErr::Incomplete)
    }

    fn list(&mut self) -> PResult<()> {
        self.ws();
        self.expect('[')?;
        loop {
            self.ws();
            if self.peek()? == ']' {
                self.pos += 1;
                break;
            }
            self.call()?;
            self.ws();
            match self.bump()? {
                ',' => {}
                ']' => break,
                _ => return Err(PErr::Invalid),
            }
        }
        self.ws();
        if self.pos < self.s.len() {
            return Err(PErr::Invalid);
        }
        Ok(())
    }

    fn call(&mut self) -> PResult<()> {
        self.calls.push(PCall::default());
        let name = self.ident()?;
        let last = self.calls.len() - 1;
        self.calls[last].name = name;
        self.expect('(')?;
        loop {
            self.ws();
            if self.peek()? == ')' {
                self.pos += 1;
                self.calls[last].named = true;
                break;
            }
            let key = self.ident()?;
            self.ws();
            self.expect('=')?;
            // The name goes out once the call has shown a keyword argument
            // (or none), so positional arguments still make it content.
            self.calls[last].named = true;
            self.ws();
            let value = self.value()?;
            self.calls[last].args.push((key, value));
            self.ws();
            match self.bump()? {
                ',' => {}
                ')' => break,
                _ => return Err(PErr::Invalid),
            }
        }
        self.calls[last].closed = true;
        Ok(())
    }

    /// A literal, as JSON text.
    fn value(&mut self) -> PResult<String> {
        match self.peek()? {
            '\'' | '"' => self.string().map(|s| json_string(&s)),
            '[' => {
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    self.ws();
                    if self.peek()? == ']' {
                        self.pos += 1;
                        break;
                    }
                    items.push(self.value()?);
                    self.ws();
                    match self.bump()? {
                        ',' => {}
                        ']' => break,
                        _ => return Err(PErr::Invalid),
                    }
                }
                Ok(format!("[{}]", items.join(", ")))
            }
            '{' => {
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    self.ws();
                    match self.peek()? {
                        '}' => {
                            self.pos += 1;
                            break;
                        }
                        '\'' | '"' => {}
                        _ => return Err(PErr::Invalid),
                    }
                    let key = self.string()?;
                    self.ws();
                    self.expect(':')?;
                    self.ws();
                    items.push(format!("{}: {}", json_string(&key), self.value()?));
                    self.ws();
                    match self.bump()? {
                        ',' => {}
                        '}' => break,
                        _ => return Err(PErr::Invalid),
                    }
                }
                Ok(format!("{{{}}}", items.join(", ")))
            }
            c if c.is_ascii_digit() || c == '-' || c == '.' => self.number(),
            _ => match self.ident()?.as_str() {
                "True" => Ok("true".into()),
                "False" => Ok("false".into()),
                "None" => Ok("null".into()),
                _ => Err(PErr::Invalid),
            },
        }
    }

    fn number(&mut self) -> PResult<String> {
        let start = self.pos;
        let mut prev = ' ';
        while let Ok(c) = self.peek() {
            let ok = c.is_ascii_digit()
                || c == '.'
                || matches!(c, 'e' | 'E')
                || (matches!(c, '-' | '+') && (self.pos == start || matches!(prev, 'e' | 'E')));
            if !ok {
                break;
            }
            prev = c;
            self.pos += c.len_utf8();
        }
        if self.pos == self.s.len() {
            return Err(PErr::Incomplete);
        }
        let tok = &self.s[start..self.pos];
        let digits = tok.trim_start_matches('-');
        if digits.is_empty() {
            return Err(PErr::Invalid);
        }
        if digits.contains(['.', 'e', 'E']) {
            let x: f64 = tok.parse().map_err(|_| PErr::Invalid)?;
            return Ok(py_float_repr(x));
        }
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PErr::Invalid);
        }
        // Python rejects leading zeros in decimal integers ("007").
        if digits.len() > 1 && digits.starts_with('0') {
            return if digits.bytes().all(|b| b == b'0') {
                Ok("0".into())
            } else {
                Err(PErr::Invalid)
            };
        }
        Ok(if digits == "0" {
            "0".into()
        } else {
            tok.to_string()
        })
    }

    fn string(&mut self) -> PResult<String> {
        let quote = self.bump()?;
        let mut out = String::new();
        loop {
            match self.bump()? {
                c if c == quote => {
                    // `''` could still open a triple-quoted string, which is
                    // not accepted.
                    if out.is_empty() && self.peek()? == quote {
                        return Err(PErr::Invalid);
                    }
                    return Ok(out);
                }
                '\n' => return Err(PErr::Invalid),
                '\\' => {
                    let e = self.bump()?;
                    match e {
                        '\n' => {}
                        '\\' | '\'' | '"' => out.push(e),
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        'b' => out.push('\u{8}'),
                        'f' => out.push('\u{c}'),
                        'v' => out.push('\u{b}'),
                        'a' => out.push('\u{7}'),
                        'x' | 'u' | 'U' => {
                            let n = match e {
                                'x' => 2,
                                'u' => 4,
                                _ => 8,
                            };
                            let mut code = 0u32;
                            for _ in 0..n {
                                let d = self.bump()?.to_digit(16).ok_or(PErr::Invalid)?;
                                code = code * 16 + d;
                            }
                            out.push(char::from_u32(code).ok_or(PErr::Invalid)?);
                        }
                        '0'..='7' => {
                            let mut code = e.to_digit(8).unwrap_or(0);
                            for _ in 0..2 {
                                match self.peek()?.to_digit(8) {
                                    Some(d) => {
                                        code = code * 8 + d;
                                        self.pos += 1;
                                    }
                                    None => break,
                                }
                            }
                            out.push(char::from_u32(code).ok_or(PErr::Invalid)?);
                        }
                        // Python keeps unknown escapes as written.
                        other => {
                            out.push('\\');
                            out.push(other);
                        }
                    }
                }
                c => out.push(c),
            }
        }
    }
}

/// The calls found in `text` so far and whether the list is complete.
fn parse(text: &str) -> (Vec<PCall>, PResult<()>) {
    let mut p = Parser {
        s: text,
        pos: 0,
        calls: Vec::new(),
    };
    let r = p.list();
    (p.calls, r)
}

enum Mode {
    Start,
    List,
    Plain,
    Dead,
}

pub struct PythonicStream {
    mode: Mode,
    held: String,
    /// Per call: the arguments text sent so far (None: name not sent).
    sent: Vec<Option<String>>,
    failed: bool,
}

impl Default for PythonicStream {
    fn default() -> Self {
        Self {
            mode: Mode::Start,
            held: String::new(),
            sent: Vec::new(),
            failed: false,
        }
    }
}

impl PythonicStream {
    fn update(&mut self, eof: bool, out: &mut Vec<ToolEvent>) {
        let (calls, result) = parse(&self.held);
        if result == Err(PErr::Invalid) || (eof && result.is_err()) {
            self.failed = true;
            if self.sent.is_empty() {
                push_content(out, &self.held);
                self.mode = Mode::Plain;
            } else {
                self.mode = Mode::Dead;
            }
            self.held.clear();
            return;
        }
        for (index, call) in calls.iter().enumerate() {
            if !call.named {
                break;
            }
            if index == self.sent.len() {
                self.sent.push(Some(String::new()));
                out.push(ToolEvent::Start {
                    index,
                    name: call.name.clone(),
                });
            }
            let args = call.arguments();
            let sent = self.sent[index].get_or_insert_with(String::new);
            // Complete values only ever extend what was sent.
            debug_assert!(args.starts_with(sent.as_str()), "{args:?} vs {sent:?}");
            if args.len() > sent.len() && args.starts_with(sent.as_str()) {
                push_args(out, index, args[sent.len()..].to_string());
                *sent = args;
            }
        }
    }
}

impl FormatStream for PythonicStream {
    fn push(&mut self, text: &str, out: &mut Vec<ToolEvent>) {
        match self.mode {
            Mode::Start => {
                self.held.push_str(text);
                match self.held.trim_start().chars().next() {
                    None => {}
                    Some('[') => {
                        self.mode = Mode::List;
                        self.update(false, out);
                    }
                    Some(_) => {
                        push_content(out, &self.held);
                        self.held.clear();
                        self.mode = Mode::Plain;
                    }
                }
            }
            Mode::List => {
                self.held.push_str(text);
                self.update(false, out);
            }
            Mode::Plain => push_content(out, text),
            Mode::Dead => {}
        }
    }

    fn finish(&mut self, out: &mut Vec<ToolEvent>) {
        match self.mode {
            Mode::Start => push_content(out, &self.held),
            Mode::List => self.update(true, out),
            Mode::Plain | Mode::Dead => {}
        }
        self.held.clear();
    }

    fn failed(&self) -> bool {
        self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check_fixtures, Fixture};
    use super::super::ToolCallParser;

    #[test]
    fn fixtures() {
        let fixtures: &[Fixture] = &[
            (
                "[get_weather(city='San Francisco', metric=\"celsius\")]",
                &[("get_weather", r#"{"city": "San Francisco", "metric": "celsius"}"#)],
                None,
            ),
            (
                "[a(x=1, y=2.50, z=-3, big=12345678901234567890), b(), c(l=[1, 'two', None], d={'k': True, \"q\": [False]}, e=1e20)]",
                &[
                    ("a", r#"{"x": 1, "y": 2.5, "z": -3, "big": 12345678901234567890}"#),
                    ("b", "{}"),
                    ("c", r#"{"l": [1, "two", null], "d": {"k": true, "q": [false]}, "e": 1e+20}"#),
                ],
                None,
            ),
            (
                "  [f(s='it\\'s \\u00e9\\n\\x41', t=\"tab\\there\")]\n",
                &[("f", "{\"s\": \"it's é\\nA\", \"t\": \"tab\\there\"}")],
                None,
            ),
            ("The weather is nice.", &[], Some("The weather is nice.")),
            ("[1, 2, 3] are numbers", &[], Some("[1, 2, 3] are numbers")),
            ("[f(x=1)", &[], Some("[f(x=1)")),
            ("[f(x=1)] and then text", &[], Some("[f(x=1)] and then text")),
            ("[f(1)]", &[], Some("[f(1)]")),
        ];
        // 5 and 6 went out as calls before the reply proved malformed.
        check_fixtures(ToolCallParser::Pythonic, fixtures, &[5, 6]);
    }
}
