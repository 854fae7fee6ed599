//! `--config FILE.yaml`, as vLLM's: a YAML mapping whose keys are long flag
//! names without the dashes (`tensor-parallel-size: 2` or
//! `tensor_parallel_size: 2`) and whose values are the flags' values.
//!
//! As vLLM's `FlexibleArgumentParser` does, the file is turned into
//! command-line arguments placed before the user's own, so the normal parser
//! checks every value as if it had been typed. The keys are looked up in the
//! clap definition of the subcommand itself, never in a list kept here: a
//! flag added to a command works in files with no change to this module.
//!
//! Precedence is vLLM's: command line over file over defaults. A setting the
//! command line gives (or one that conflicts with it, such as `--model`
//! against the positional MODEL) is left out of the file's arguments, so the
//! command line wins even for list flags, whose occurrences would otherwise
//! add up.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_yaml::Value;

/// The id of the `--config` argument a subcommand declares to take a file.
pub const CONFIG_ARG: &str = "config";

/// Where in a config file something is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    pub path: PathBuf,
    /// One-based; `None` when the YAML parser could not tell.
    pub line: Option<usize>,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config file {}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {}: invalid YAML: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error(
        "config file {}: expected a mapping of flag names to values (such as `port: 8000`), got {found}",
        path.display()
    )]
    NotAMapping { path: PathBuf, found: String },
    #[error("{at}: key {key} is not a flag name (keys are long flag names such as `port`)")]
    KeyNotAString { at: At, key: String },
    #[error(
        "{at}: unknown key '{key}': `{command}` has no --{} flag{hint}",
        key.replace('_', "-")
    )]
    UnknownKey {
        at: At,
        key: String,
        command: String,
        /// "; did you mean 'FLAG'?" or empty.
        hint: String,
    },
    #[error("{at}: '{key}' sets the same flag as '{first}' (line {first_line})")]
    Duplicate {
        at: At,
        key: String,
        first: String,
        first_line: String,
    },
    #[error("{at}: '{key}': expected {expected}, got {got}")]
    WrongType {
        at: At,
        key: String,
        expected: String,
        /// The value as given, then why the flag's parser refused it, if it did.
        got: String,
    },
    #[error("{at}: '{key}': {message}")]
    Rejected {
        at: At,
        key: String,
        message: String,
    },
    #[error("config file {}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// Parses the process's command line with its `--config FILE` spliced in;
/// exits with clap's message on a command-line error, as `P::parse` does.
/// (Errors are boxed: they are large and rare.)
pub fn parse<P: clap::Parser>() -> Result<P, Box<ConfigFileError>> {
    let argv = expand_args(&P::command(), std::env::args_os().collect())?;
    Ok(P::parse_from(argv))
}

/// `argv` with the settings of its `--config FILE` inserted right after the
/// subcommand; `argv` itself when no subcommand that takes `--config` got one.
pub fn expand_args(
    cmd: &Command,
    argv: Vec<OsString>,
) -> Result<Vec<OsString>, Box<ConfigFileError>> {
    let mentions_config = argv.iter().skip(1).any(|a| {
        let a = a.to_string_lossy();
        a == "--config" || a.starts_with("--config=")
    });
    if !mentions_config {
        return Ok(argv);
    }
    let mut root = cmd.clone();
    root.build();
    // A lenient first pass finds the subcommand, the file and what the user
    // gave; any error in the user's own arguments is left to the real parse.
    let Ok(matches) = lenient(root.clone()).try_get_matches_from(&argv) else {
        return Ok(argv);
    };
    let mut leaf = &root;
    let mut leaf_matches = &matches;
    let mut path: Vec<&Command> = Vec::new();
    while let Some((name, sub)) = leaf_matches.subcommand() {
        let Some(next) = leaf.find_subcommand(name) else {
            break;
        };
        leaf = next;
        path.push(next);
        leaf_matches = sub;
    }
    if leaf.get_arguments().all(|a| a.get_id() != CONFIG_ARG) {
        return Ok(argv);
    }
    let file = match leaf_matches.try_get_raw(CONFIG_ARG) {
        Ok(Some(mut values)) => match values.next_back() {
            Some(v) => PathBuf::from(v),
            None => return Ok(argv),
        },
        _ => return Ok(argv),
    };
    let text = std::fs::read_to_string(&file).map_err(|source| ConfigFileError::Read {
        path: file.clone(),
        source,
    })?;
    let insert_at = after_subcommands(&argv, &path);
    let given = given_on_command_line(leaf, leaf_matches, &argv[insert_at..]);
    let command_name = std::iter::once(root.get_name())
        .chain(path.iter().map(|c| c.get_name()))
        .collect::<Vec<_>>()
        .join(" ");
    let file_args = file_args(leaf, &command_name, &file, &text, &given)?;

    let mut out = argv[..insert_at].to_vec();
    out.extend(file_args);
    out.extend_from_slice(&argv[insert_at..]);
    Ok(out)
}

/// `cmd` ignoring errors, down to its nested subcommands (clap's setting is
/// not inherited).
fn lenient(cmd: Command) -> Command {
    cmd.ignore_errors(true).mut_subcommands(lenient)
}

/// The index just past the subcommand names (or aliases) in `argv`.
fn after_subcommands(argv: &[OsString], path: &[&Command]) -> usize {
    let mut i = 1;
    for cmd in path {
        while i < argv.len() {
            let tok = argv[i].to_string_lossy();
            i += 1;
            if tok == cmd.get_name() || cmd.get_all_aliases().any(|a| a == tok) {
                break;
            }
        }
    }
    i.min(argv.len())
}

/// Ids of the arguments the user's own command line sets. The lenient parse
/// stops at the first error, so `--long` tokens are also looked up directly.
fn given_on_command_line(
    leaf: &Command,
    matches: &ArgMatches,
    user: &[OsString],
) -> HashSet<String> {
    let mut given: HashSet<String> = leaf
        .get_arguments()
        .filter(|a| matches.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine))
        .map(|a| a.get_id().to_string())
        .collect();
    for tok in user {
        let tok = tok.to_string_lossy();
        if tok == "--" {
            break;
        }
        let Some(name) = tok.strip_prefix("--") else {
            continue;
        };
        let name = name.split('=').next().unwrap_or(name);
        if let Some(arg) = leaf
            .get_arguments()
            .find(|a| long_names(a).any(|l| l == name))
        {
            given.insert(arg.get_id().to_string());
        }
    }
    given
}

/// An argument's long name and long aliases.
fn long_names(arg: &Arg) -> impl Iterator<Item = &str> {
    arg.get_long()
        .into_iter()
        .chain(arg.get_all_aliases().unwrap_or_default())
}

/// Whether a config key may set this argument.
fn settable(arg: &Arg) -> bool {
    !matches!(
        arg.get_action(),
        ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
    )
}

/// The argument a key names: a long flag or alias (dashes or underscores),
/// else a positional by its id (`model` for `bench throughput MODEL`).
fn find_arg<'a>(leaf: &'a Command, key: &str) -> Option<&'a Arg> {
    let name = key.replace('_', "-");
    let args = || leaf.get_arguments().filter(|a| settable(a));
    args()
        .find(|a| long_names(a).any(|l| l == name))
        .or_else(|| {
            args().find(|a| a.is_positional() && a.get_id().as_str().replace('_', "-") == name)
        })
}

/// The file's settings as arguments, checked against `leaf`'s definitions.
fn file_args(
    leaf: &Command,
    command_name: &str,
    path: &Path,
    text: &str,
    given: &HashSet<String>,
) -> Result<Vec<OsString>, ConfigFileError> {
    let entries = match serde_yaml::from_str::<Top>(text) {
        // An empty file sets nothing.
        Ok(Top::Empty) => return Ok(Vec::new()),
        Ok(Top::Entries(entries)) => entries,
        Ok(Top::Other(kind)) => {
            return Err(ConfigFileError::NotAMapping {
                path: path.to_path_buf(),
                found: kind.into(),
            })
        }
        Err(e) => {
            return Err(ConfigFileError::Syntax {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
        }
    };
    let at = |index: usize| At {
        path: path.to_path_buf(),
        line: key_line(text, index),
    };
    // Checks the file's arguments alone, without the environment: a bad
    // variable is not the file's fault (the real parse reports it).
    let mut checker = leaf.clone().no_binary_name(true).mut_args(|a| a.env(None));
    // (arg id, key, index) of the keys seen, for duplicates.
    let mut seen: Vec<(String, String, usize)> = Vec::new();
    let mut positionals: Vec<(usize, Vec<OsString>)> = Vec::new();
    let mut flags: Vec<OsString> = Vec::new();
    for (index, (key, value)) in entries.iter().enumerate() {
        let key = match key {
            Value::String(s) => s.clone(),
            other => {
                return Err(ConfigFileError::KeyNotAString {
                    at: at(index),
                    key: scalar_text(other).unwrap_or_else(|| kind_of(other).into()),
                })
            }
        };
        let Some(arg) = find_arg(leaf, &key) else {
            return Err(unknown_key(leaf, command_name, &key, at(index)));
        };
        let id = arg.get_id().to_string();
        if id == CONFIG_ARG {
            return Err(ConfigFileError::Rejected {
                at: at(index),
                key,
                message: "a config file cannot name another config file".into(),
            });
        }
        if let Some((_, first, first_index)) = seen.iter().find(|(i, _, _)| *i == id) {
            return Err(ConfigFileError::Duplicate {
                at: at(index),
                key,
                first: first.clone(),
                first_line: key_line(text, *first_index)
                    .map_or_else(|| "?".into(), |l| l.to_string()),
            });
        }
        seen.push((id.clone(), key.clone(), index));
        let tokens =
            tokens_for(leaf, arg, value).map_err(|mismatch| mismatch.error(&key, at(index)))?;
        check_alone(&mut checker, arg, &key, value, &tokens, || at(index))?;
        if overridden(leaf, arg, given) {
            continue;
        }
        match arg.get_index() {
            Some(pos) => positionals.push((pos, tokens)),
            None => flags.extend(tokens),
        }
    }
    if !positionals.is_empty()
        && leaf
            .get_positionals()
            .any(|p| given.contains(p.get_id().as_str()))
    {
        // Positional values are placed by order: mixing the file's with the
        // command line's could shift them.
        return Err(ConfigFileError::Invalid {
            path: path.to_path_buf(),
            message:
                "positional arguments can come from the file only when the command line gives none"
                    .into(),
        });
    }
    positionals.sort_by_key(|(pos, _)| *pos);
    let mut out: Vec<OsString> = positionals.into_iter().flat_map(|(_, t)| t).collect();
    out.extend(flags);
    // The keys together, for conflicts between them.
    if let Err(e) = checker.try_get_matches_from_mut(&out) {
        if e.kind() == clap::error::ErrorKind::ArgumentConflict {
            return Err(ConfigFileError::Invalid {
                path: path.to_path_buf(),
                message: clap_message(&e),
            });
        }
    }
    Ok(out)
}

/// Whether the command line sets this argument, or one that conflicts with
/// it (the file's `model` against the positional MODEL): it wins then.
fn overridden(leaf: &Command, arg: &Arg, given: &HashSet<String>) -> bool {
    if given.contains(arg.get_id().as_str()) {
        return true;
    }
    let conflicts = leaf
        .get_arg_conflicts_with(arg)
        .into_iter()
        .any(|c| given.contains(c.get_id().as_str()));
    conflicts
        || leaf.get_arguments().any(|other| {
            given.contains(other.get_id().as_str())
                && leaf
                    .get_arg_conflicts_with(other)
                    .iter()
                    .any(|c| c.get_id() == arg.get_id())
        })
}

fn unknown_key(leaf: &Command, command_name: &str, key: &str, at: At) -> ConfigFileError {
    let wanted = key.replace('_', "-");
    let best = leaf
        .get_arguments()
        .filter(|a| settable(a) && a.get_id() != CONFIG_ARG)
        .flat_map(|a| long_names(a).map(str::to_string).collect::<Vec<_>>())
        .map(|name| (strsim::jaro_winkler(&wanted, &name), name))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let undashed = key.trim_start_matches('-');
    let hint = match best {
        _ if undashed != key && find_arg(leaf, undashed).is_some() => {
            format!("; keys are flag names without the dashes: '{undashed}'")
        }
        // clap's own threshold for its "similar argument" tip.
        Some((score, name)) if score > 0.7 => format!("; did you mean '{name}'?"),
        _ => String::new(),
    };
    ConfigFileError::UnknownKey {
        at,
        key: key.into(),
        command: command_name.into(),
        hint,
    }
}

/// Parses one key's arguments alone, so a value clap refuses is reported
/// against its key and line rather than as a command-line error.
fn check_alone(
    checker: &mut Command,
    arg: &Arg,
    key: &str,
    value: &Value,
    tokens: &[OsString],
    // Lazily: finding a key's line parses the file again.
    at: impl FnOnce() -> At,
) -> Result<(), ConfigFileError> {
    use clap::error::ErrorKind;
    if tokens.is_empty() {
        return Ok(());
    }
    let Err(e) = checker.try_get_matches_from_mut(tokens) else {
        return Ok(());
    };
    match e.kind() {
        // Satisfied (or not) by the rest of the file and the command line.
        ErrorKind::MissingRequiredArgument
        | ErrorKind::MissingSubcommand
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        | ErrorKind::ArgumentConflict => Ok(()),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation | ErrorKind::InvalidUtf8 => {
            let reason = std::error::Error::source(&e)
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            Err(ConfigFileError::WrongType {
                at: at(),
                key: key.into(),
                expected: expected(arg),
                got: format!("{}{reason}", shown(value)),
            })
        }
        _ => Err(ConfigFileError::Rejected {
            at: at(),
            key: key.into(),
            message: clap_message(&e),
        }),
    }
}

/// clap's message without its "error: " prefix, usage and tips.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// A value of the wrong shape for its flag, found before clap sees it.
struct Mismatch {
    expected: String,
    value: Value,
}

impl Mismatch {
    fn error(self, key: &str, at: At) -> ConfigFileError {
        ConfigFileError::WrongType {
            at,
            key: key.into(),
            expected: self.expected,
            got: shown(&self.value),
        }
    }
}

/// The arguments that set `arg` to `value`, by the flag's kind: a switch is
/// present or absent (`false` turns to `--no-FLAG` where the command has
/// it), a list flag is repeated once per item, a mapping or list given to a
/// single-valued flag is JSON text (`hf-overrides: {...}`), anything else is
/// `--flag=VALUE` (the `=` keeps a value such as `-1` from reading as a flag).
fn tokens_for(leaf: &Command, arg: &Arg, value: &Value) -> Result<Vec<OsString>, Mismatch> {
    let mismatch = |expected: String| Mismatch {
        expected,
        value: value.clone(),
    };
    let long = arg.get_long();
    let flag = |v: &str| -> OsString {
        match long {
            Some(l) => format!("--{l}={v}").into(),
            None => v.into(),
        }
    };
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => {
            let Value::Bool(on) = value else {
                return Err(mismatch("true or false".into()));
            };
            let l = long.unwrap_or_default();
            if *on {
                return Ok(vec![format!("--{l}").into()]);
            }
            // `enable-prefix-caching: false` means `--no-enable-prefix-caching`
            // (and `no-x: false` means `--x`) where the pair exists.
            let partner = match l.strip_prefix("no-") {
                Some(base) => base.to_string(),
                None => format!("no-{l}"),
            };
            let has_partner = leaf.get_arguments().any(|a| {
                a.get_long() == Some(partner.as_str())
                    && matches!(a.get_action(), ArgAction::SetTrue | ArgAction::SetFalse)
            });
            Ok(if has_partner {
                vec![format!("--{partner}").into()]
            } else {
                Vec::new()
            })
        }
        ArgAction::Count => {
            let times = match value {
                Value::Bool(b) => u64::from(*b),
                Value::Number(n) => n.as_u64().ok_or_else(|| mismatch(expected(arg)))?,
                _ => return Err(mismatch(expected(arg))),
            };
            let l = long.unwrap_or_default();
            Ok((0..times).map(|_| format!("--{l}").into()).collect())
        }
        _ => {
            let multiple = matches!(arg.get_action(), ArgAction::Append);
            let per_occurrence = arg.get_num_args().map_or(1, |r| r.max_values());
            match value {
                Value::Null => Err(mismatch(expected(arg))),
                Value::Sequence(items) if multiple => items
                    .iter()
                    .map(|item| {
                        Ok(flag(
                            &item_text(item).ok_or_else(|| mismatch(expected(arg)))?,
                        ))
                    })
                    .collect(),
                Value::Sequence(items) if per_occurrence > 1 => {
                    let mut out: Vec<OsString> =
                        long.map(|l| format!("--{l}").into()).into_iter().collect();
                    for item in items {
                        out.push(
                            item_text(item)
                                .ok_or_else(|| mismatch(expected(arg)))?
                                .into(),
                        );
                    }
                    Ok(out)
                }
                Value::Sequence(_) | Value::Mapping(_) => Ok(vec![flag(
                    &json_text(value).ok_or_else(|| mismatch(expected(arg)))?,
                )]),
                Value::Tagged(_) => Err(mismatch(expected(arg))),
                scalar => Ok(vec![flag(
                    &scalar_text(scalar).ok_or_else(|| mismatch(expected(arg)))?,
                )]),
            }
        }
    }
}

/// A list item: a scalar as text, a nested mapping or list as JSON.
fn item_text(v: &Value) -> Option<String> {
    match v {
        Value::Sequence(_) | Value::Mapping(_) => json_text(v),
        other => scalar_text(other),
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn json_text(v: &Value) -> Option<String> {
    serde_json::to_value(v).ok().map(|j| j.to_string())
}

/// A value as the error messages show it.
fn shown(v: &Value) -> String {
    match v {
        Value::Null => "no value".into(),
        Value::String(s) => format!("{s:?}"),
        Value::Bool(_) | Value::Number(_) => scalar_text(v).unwrap_or_default(),
        Value::Sequence(_) | Value::Mapping(_) => {
            format!("{} {}", kind_of(v), json_text(v).unwrap_or_default())
        }
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// What a flag takes, in words, from its value parser's type and choices.
fn expected(arg: &Arg) -> String {
    use std::any::TypeId;
    let choices: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|p| !p.is_hide_set())
        .map(|p| p.get_name().to_string())
        .collect();
    let one = if !choices.is_empty() {
        format!("one of {}", choices.join(", "))
    } else {
        match arg.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse => return "true or false".into(),
            ArgAction::Count => return "a count (a whole number) or true or false".into(),
            _ => {}
        }
        let t = arg.get_value_parser().type_id();
        macro_rules! unsigned {
            ($($ty:ty),*) => {
                $(if t == TypeId::of::<$ty>() {
                    return with_list(arg, format!("a whole number from 0 to {}", <$ty>::MAX));
                })*
            };
        }
        unsigned!(u8, u16, u32);
        if t == TypeId::of::<u64>() || t == TypeId::of::<usize>() {
            "a whole number (0 or more)".to_string()
        } else if [
            TypeId::of::<i8>(),
            TypeId::of::<i16>(),
            TypeId::of::<i32>(),
            TypeId::of::<i64>(),
            TypeId::of::<isize>(),
        ]
        .iter()
        .any(|i| t == *i)
        {
            "a whole number".into()
        } else if t == TypeId::of::<f64>() || t == TypeId::of::<f32>() {
            "a number".into()
        } else if t == TypeId::of::<bool>() {
            "true or false".into()
        } else {
            "a string".into()
        }
    };
    with_list(arg, one)
}

fn with_list(arg: &Arg, one: String) -> String {
    if matches!(arg.get_action(), ArgAction::Append) {
        format!("{one}, or a list of them")
    } else {
        one
    }
}

/// The document's top level. Its entries are kept as a list, not a
/// `Mapping`, so a key given twice is reported with both lines (the
/// mapping type refuses duplicates without saying where).
enum Top {
    Empty,
    Entries(Vec<(Value, Value)>),
    Other(&'static str),
}

impl<'de> serde::Deserialize<'de> for Top {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Top, D::Error> {
        d.deserialize_any(TopVisitor)
    }
}

struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Top;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping of flag names to values")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<Value, Value>()? {
            entries.push(entry);
        }
        Ok(Top::Entries(entries))
    }
    fn visit_unit<E>(self) -> Result<Top, E> {
        Ok(Top::Empty)
    }
    fn visit_none<E>(self) -> Result<Top, E> {
        Ok(Top::Empty)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Top, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Top::Other("a list"))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Top, E> {
        Ok(Top::Other("a boolean"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Top, E> {
        Ok(Top::Other("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Top, E> {
        Ok(Top::Other("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Top, E> {
        Ok(Top::Other("a number"))
    }
    fn visit_str<E>(self, _: &str) -> Result<Top, E> {
        Ok(Top::Other("a string"))
    }
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, _: A) -> Result<Top, A::Error> {
        Ok(Top::Other("a tagged value"))
    }
}

/// The one-based line of the `index`-th top-level key. serde_yaml keeps no
/// positions in its values, but marks an error raised while reading a key
/// with that key's position: so fail on purpose at that key.
fn key_line(text: &str, index: usize) -> Option<usize> {
    let de = serde_yaml::Deserializer::from_str(text);
    match FindKey(index).deserialize(de) {
        Err(e) => e.location().map(|l| l.line()),
        Ok(()) => None,
    }
}

struct FindKey(usize);

impl<'de> DeserializeSeed<'de> for FindKey {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FindKey {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        for _ in 0..self.0 {
            if map.next_key::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            map.next_value::<IgnoredAny>()?;
        }
        map.next_key_seed(FailHere)?;
        Ok(())
    }
}

/// Refuses whatever it is given, so the error carries the position.
struct FailHere;

impl<'de> DeserializeSeed<'de> for FailHere {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FailHere {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("nothing (marks a position)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    #[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
    enum Policy {
        Fcfs,
        Priority,
    }

    /// The shapes of flag the real commands have.
    #[derive(Debug, Parser)]
    #[command(name = "tool")]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Debug, Subcommand)]
    enum Cmd {
        Serve(ServeArgs),
        Run {
            #[arg(value_name = "MODEL")]
            model: String,
            #[arg(long)]
            config: Option<PathBuf>,
            #[arg(long, default_value_t = 1)]
            n: usize,
        },
        NoConfig {
            #[arg(long)]
            x: Option<String>,
        },
        #[command(subcommand)]
        Nested(NestedCmd),
    }

    #[derive(Debug, Subcommand)]
    enum NestedCmd {
        Leaf {
            #[arg(value_name = "MODEL")]
            model: String,
            #[arg(long)]
            config: Option<PathBuf>,
        },
    }

    #[derive(Debug, clap::Args)]
    struct ServeArgs {
        #[arg(value_name = "MODEL", conflicts_with = "model")]
        model_tag: Option<String>,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        #[arg(long, default_value_t = 0.9)]
        gpu_memory_utilization: f64,
        #[arg(long, allow_negative_numbers = true)]
        num_gpus: Option<f64>,
        #[arg(long, default_value = "auto")]
        dtype: String,
        #[arg(long, visible_alias = "tp", default_value_t = 1)]
        tensor_parallel_size: usize,
        #[arg(long)]
        enforce_eager: bool,
        #[arg(long, overrides_with = "no_enable_prefix_caching")]
        enable_prefix_caching: bool,
        #[arg(long, overrides_with = "enable_prefix_caching")]
        no_enable_prefix_caching: bool,
        #[arg(long, num_args = 1..)]
        served_model_name: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        endpoints: Vec<String>,
        #[arg(long)]
        hf_overrides: Option<String>,
        #[arg(long, value_enum, default_value_t = Policy::Fcfs)]
        scheduling_policy: Policy,
        #[arg(short, long, action = clap::ArgAction::Count)]
        verbose: u8,
    }

    struct File(PathBuf);

    impl File {
        fn new(text: &str) -> File {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "flotilla-config-{}-{}.yaml",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&p, text).unwrap();
            File(p)
        }
        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn expand(yaml: &str, args: &[&str]) -> Result<Vec<OsString>, Box<ConfigFileError>> {
        let f = File::new(yaml);
        let argv: Vec<OsString> = std::iter::once("tool")
            .map(str::to_string)
            .chain(args.iter().map(|a| a.replace("FILE", f.path())))
            .map(OsString::from)
            .collect();
        expand_args(&Cli::command(), argv)
    }

    fn serve(yaml: &str, args: &[&str]) -> ServeArgs {
        let argv = expand(yaml, args).unwrap();
        match Cli::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
            .cmd
        {
            Cmd::Serve(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn error(yaml: &str) -> String {
        expand(yaml, &["serve", "--config", "FILE"])
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn without_config_the_command_line_is_untouched() {
        let argv: Vec<OsString> = ["tool", "serve", "m", "--port", "1"]
            .map(OsString::from)
            .to_vec();
        assert_eq!(expand_args(&Cli::command(), argv.clone()).unwrap(), argv);
    }

    #[test]
    fn every_value_type() {
        let a = serve(
            "model: /m\n\
             port: 9000\n\
             gpu_memory_utilization: 0.5\n\
             num-gpus: -1\n\
             dtype: bfloat16\n\
             enforce-eager: true\n\
             served-model-name: [a, b]\n\
             endpoints: [http://x:1, 'http://y:2']\n\
             hf-overrides:\n  architectures: [LlamaForCausalLM]\n  rope_theta: 10000.0\n\
             scheduling_policy: priority\n\
             verbose: 2\n",
            &["serve", "--config", "FILE"],
        );
        assert_eq!(a.model.as_deref(), Some("/m"));
        assert_eq!(a.port, 9000);
        assert_eq!(a.gpu_memory_utilization, 0.5);
        assert_eq!(a.num_gpus, Some(-1.0));
        assert_eq!(a.dtype, "bfloat16");
        assert!(a.enforce_eager);
        assert_eq!(a.served_model_name, ["a", "b"]);
        assert_eq!(a.endpoints, ["http://x:1", "http://y:2"]);
        let hf: serde_json::Value =
            serde_json::from_str(a.hf_overrides.as_deref().unwrap()).unwrap();
        assert_eq!(
            hf,
            serde_json::json!({"architectures": ["LlamaForCausalLM"], "rope_theta": 10000.0})
        );
        assert_eq!(a.scheduling_policy, Policy::Priority);
        assert_eq!(a.verbose, 2);
        // JSON given as a string is passed as is.
        let a = serve(
            r#"hf-overrides: '{"a": 1}'"#,
            &["serve", "--config", "FILE"],
        );
        assert_eq!(a.hf_overrides.as_deref(), Some(r#"{"a": 1}"#));
        // A comma list for a comma-delimited flag; the visible alias.
        let a = serve(
            "endpoints: http://x:1,http://y:2\ntp: 4",
            &["serve", "--config", "FILE"],
        );
        assert_eq!(a.endpoints, ["http://x:1", "http://y:2"]);
        assert_eq!(a.tensor_parallel_size, 4);
    }

    #[test]
    fn booleans_both_ways() {
        let cfg = ["serve", "--config", "FILE"];
        assert!(!serve("enforce-eager: false", &cfg).enforce_eager);
        // Default-on switch turned off with `false`, and back on by the CLI.
        let a = serve("enable-prefix-caching: false", &cfg);
        assert!(a.no_enable_prefix_caching && !a.enable_prefix_caching);
        let a = serve(
            "enable_prefix_caching: false",
            &["serve", "--config", "FILE", "--enable-prefix-caching"],
        );
        assert!(!a.no_enable_prefix_caching);
        let a = serve(
            "no-enable-prefix-caching: true",
            &["serve", "--enable-prefix-caching", "--config", "FILE"],
        );
        assert!(
            !a.no_enable_prefix_caching,
            "the command line comes last and wins"
        );
        let a = serve(
            "enable-prefix-caching: true",
            &["serve", "--config", "FILE", "--no-enable-prefix-caching"],
        );
        assert!(a.no_enable_prefix_caching);
    }

    #[test]
    fn command_line_over_file_over_defaults() {
        let yaml = "port: 9000\nserved-model-name: [a, b]\ndtype: half\nmodel: /file-model\n";
        let a = serve(yaml, &["serve", "--config", "FILE"]);
        assert_eq!(
            (a.port, a.dtype.as_str(), a.tensor_parallel_size),
            (9000, "half", 1)
        );
        let a = serve(
            yaml,
            &[
                "serve",
                "/cli-model",
                "--port",
                "7000",
                "--config",
                "FILE",
                "--served-model-name=c",
            ],
        );
        assert_eq!(a.port, 7000);
        assert_eq!(a.served_model_name, ["c"], "a CLI list replaces the file's");
        assert_eq!(a.dtype, "half");
        // The model given twice: the command line's positional wins over the
        // file's `model` (they conflict on the command line alone).
        assert_eq!(a.model_tag.as_deref(), Some("/cli-model"));
        assert_eq!(a.model, None);
        let a = serve(yaml, &["serve", "--model=/cli", "--config", "FILE"]);
        assert_eq!(a.model.as_deref(), Some("/cli"));
        // Flags before the subcommand's --config and `--flag=value` forms.
        let a = serve(yaml, &["serve", "--port=1", "--config=FILE"]);
        assert_eq!(a.port, 1);
    }

    #[test]
    fn positional_from_the_file() {
        let f = File::new("model: /m\nn: 3\n");
        let argv = expand_args(
            &Cli::command(),
            ["tool", "run", "--config", f.path()]
                .map(OsString::from)
                .to_vec(),
        )
        .unwrap();
        let Cmd::Run { model, n, .. } = Cli::try_parse_from(argv).unwrap().cmd else {
            panic!()
        };
        assert_eq!((model.as_str(), n), ("/m", 3));
        let argv = expand_args(
            &Cli::command(),
            ["tool", "run", "/cli", "--config", f.path()]
                .map(OsString::from)
                .to_vec(),
        )
        .unwrap();
        let Cmd::Run { model, n, .. } = Cli::try_parse_from(argv).unwrap().cmd else {
            panic!()
        };
        assert_eq!((model.as_str(), n), ("/cli", 3));
        // A required positional under a nested subcommand.
        let argv = expand_args(
            &Cli::command(),
            ["tool", "nested", "leaf", "--config", f.path()]
                .map(OsString::from)
                .to_vec(),
        );
        assert!(argv.unwrap_err().to_string().contains("unknown key 'n'"));
        let g = File::new("model: /m\n");
        let argv = expand_args(
            &Cli::command(),
            ["tool", "nested", "leaf", "--config", g.path()]
                .map(OsString::from)
                .to_vec(),
        )
        .unwrap();
        let Cmd::Nested(NestedCmd::Leaf { model, .. }) = Cli::try_parse_from(argv).unwrap().cmd
        else {
            panic!()
        };
        assert_eq!(model, "/m");
    }

    #[test]
    fn unknown_key_names_it_its_line_and_the_closest_flag() {
        let e = error("port: 1\n\ntensor-paralel-size: 2\n");
        assert_eq!(
            e,
            format!(
                "config file {}, line 3: unknown key 'tensor-paralel-size': `tool serve` has no \
                 --tensor-paralel-size flag; did you mean 'tensor-parallel-size'?",
                e.split(", line")
                    .next()
                    .unwrap()
                    .trim_start_matches("config file ")
            )
        );
        let e = error("port: 1\nzzzz: 2\n");
        assert!(
            e.contains("line 2: unknown key 'zzzz'") && !e.contains("did you mean"),
            "{e}"
        );
        let e = error("config: other.yaml\n");
        assert!(
            e.contains("line 1: 'config': a config file cannot name another"),
            "{e}"
        );
        let e = error("--port: 1\n");
        assert!(e.contains("without the dashes: 'port'"), "{e}");
        let e = error("help: true\n");
        assert!(e.contains("unknown key 'help'"), "{e}");
    }

    #[test]
    fn wrong_types_name_key_line_and_expected_type() {
        let e = error("dtype: half\nport: abc\n");
        assert!(e.contains(", line 2: 'port': expected a whole number from 0 to 65535, got \"abc\" (invalid digit"), "{e}");
        let e = error("port: 70000");
        assert!(
            e.contains("line 1: 'port': expected a whole number from 0 to 65535, got 70000"),
            "{e}"
        );
        let e = error("gpu-memory-utilization: [1]");
        assert!(
            e.contains("'gpu-memory-utilization': expected a number, got a list [1]"),
            "{e}"
        );
        let e = error("enforce-eager: yes");
        assert!(
            e.contains("'enforce-eager': expected true or false, got \"yes\""),
            "{e}"
        );
        let e = error("scheduling-policy: lifo");
        assert!(
            e.contains("'scheduling-policy': expected one of fcfs, priority, got \"lifo\""),
            "{e}"
        );
        let e = error("tensor-parallel-size: 1.5");
        assert!(
            e.contains("'tensor-parallel-size': expected a whole number (0 or more), got 1.5"),
            "{e}"
        );
        let e = error("dtype:\n");
        assert!(
            e.contains("'dtype': expected a string, got no value"),
            "{e}"
        );
        let e = error("served-model-name: [{a: 1}]\nport: {x: 1}");
        assert!(
            e.contains(
                "line 2: 'port': expected a whole number from 0 to 65535, got a mapping {\"x\":1}"
            ),
            "{e}"
        );
    }

    #[test]
    fn yaml_errors_and_other_shapes() {
        let e = error("port: 1\ndtype: [half\n");
        assert!(e.contains("invalid YAML") && e.contains("line 3"), "{e}");
        let e = error("port: 1\nport: 2\n");
        assert!(
            e.contains("line 2: 'port' sets the same flag as 'port' (line 1)"),
            "{e}"
        );
        let e = error("tp: 2\ntensor_parallel_size: 2\n");
        assert!(
            e.contains("line 2: 'tensor_parallel_size' sets the same flag as 'tp' (line 1)"),
            "{e}"
        );
        let e = error("- port\n");
        assert!(
            e.contains("expected a mapping of flag names to values") && e.contains("got a list"),
            "{e}"
        );
        let e = error("1: 2\n");
        assert!(e.contains("line 1: key 1 is not a flag name"), "{e}");
        let e = expand("", &["serve", "--config", "/nonexistent/x.yaml"])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read config file /nonexistent/x.yaml"),
            "{e}"
        );
        // An empty file sets nothing.
        assert_eq!(serve("", &["serve", "--config", "FILE"]).port, 8000);
        assert_eq!(
            serve("# nothing\n", &["serve", "--config", "FILE"]).port,
            8000
        );
    }

    #[test]
    fn subcommands_without_config_are_left_to_clap() {
        let argv = expand("x: 1", &["no-config", "--config", "FILE"]).unwrap();
        assert!(Cli::try_parse_from(argv).is_err());
    }

    #[test]
    fn a_bad_environment_variable_is_not_blamed_on_the_file() {
        #[derive(Debug, Parser)]
        struct EnvCli {
            #[command(subcommand)]
            cmd: EnvCmd,
        }
        #[derive(Debug, Subcommand)]
        enum EnvCmd {
            Start {
                #[arg(long)]
                config: Option<PathBuf>,
                #[arg(long, default_value_t = 1)]
                port: u16,
                #[arg(long, env = "FLOTILLA_CONFIG_FILE_TEST_TTL", default_value_t = 3)]
                ttl: u64,
            },
        }
        // Only this test's command reads the variable.
        std::env::set_var("FLOTILLA_CONFIG_FILE_TEST_TTL", "soon");
        let f = File::new("port: 2\n");
        let argv = ["x", "start", "--config", f.path()]
            .map(OsString::from)
            .to_vec();
        let argv = expand_args(&EnvCli::command(), argv).unwrap();
        let e = EnvCli::try_parse_from(&argv).unwrap_err().to_string();
        assert!(e.contains("--ttl"), "{e}");
        // The file wins over the environment.
        let f = File::new("ttl: 5\n");
        let argv = ["x", "start", "--config", f.path()]
            .map(OsString::from)
            .to_vec();
        let argv = expand_args(&EnvCli::command(), argv).unwrap();
        let EnvCmd::Start { ttl, .. } = EnvCli::try_parse_from(&argv).unwrap().cmd;
        assert_eq!(ttl, 5);
    }

    #[test]
    fn key_lines() {
        let text = "# comment\na: 1\n\nb:\n  c: 2\n'd': [1,\n  2]\ne: 3\n";
        let lines: Vec<_> = (0..5).map(|i| key_line(text, i)).collect();
        assert_eq!(lines, [Some(2), Some(4), Some(6), Some(8), None]);
    }
}
