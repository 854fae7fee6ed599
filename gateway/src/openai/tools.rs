//! `tools` and `tool_choice` on chat requests: vLLM's validation and
//! messages, which parser reads the reply, and the JSON schema with which
//! vLLM enforces `tool_choice: "required"` and a named function through
//! structured outputs.
//!
//! [`constrain_to_tool_schema`] is the one place where that schema is
//! attached to the request (as a JSON-schema structured-output constraint).

use serde_json::{json, Map, Value};

use super::tool_parsers::{constrained, ToolCallParser, ToolStream};
use worker::sampling_params::{SamplingParams, StructuredOutputRequest, StructuredOutputs};

const CORRECT_USAGE: &str =
    r#"Correct usage: `{"type": "function", "function": {"name": "my_function"}}`"#;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ToolError {
    #[error("{message}")]
    InvalidTools { message: String },
    #[error("{message}")]
    InvalidToolChoice { message: String },
    #[error(
        "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set"
    )]
    AutoNotEnabled,
    #[error("Tool definition '{name}' has multiple schemas, which is not supported.")]
    ConflictingDefs { name: String },
    #[error("tool_choice {choice} cannot be combined with {other}: both constrain the output")]
    ConflictingConstraint { choice: String, other: String },
}

impl ToolError {
    pub fn param(&self) -> &'static str {
        match self {
            ToolError::InvalidTools { .. } | ToolError::ConflictingDefs { .. } => "tools",
            _ => "tool_choice",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The tools reach the template, the reply is not parsed.
    None,
    Auto,
    Required,
    Named(String),
}

/// A request's tools after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    pub choice: ToolChoice,
    /// What the chat template gets as `tools` (None: no tools).
    pub tools: Option<Value>,
}

/// How a reply's tool calls are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolMode {
    /// `auto`: the server's `--tool-call-parser` reads the model's own format.
    Auto(ToolCallParser),
    /// Constrained output (see [`tool_schema`]).
    Required,
    Named(String),
}

impl ToolMode {
    pub fn stream(&self) -> ToolStream {
        match self {
            ToolMode::Auto(p) => p.stream(),
            ToolMode::Required => constrained::required_stream(),
            ToolMode::Named(name) => constrained::named_stream(name),
        }
    }

    /// vLLM answers `finish_reason: "tool_calls"` for auto calls and for
    /// `required`, but `stop` for a named function.
    pub fn finish_reason_tool_calls(&self) -> bool {
        !matches!(self, ToolMode::Named(_))
    }

    /// vLLM's content next to constrained calls is "" rather than null.
    pub fn empty_content(&self) -> Option<String> {
        match self {
            ToolMode::Auto(_) => None,
            _ => Some(String::new()),
        }
    }
}

fn function_of(tool: &Value) -> Option<&Map<String, Value>> {
    tool.get("function").and_then(Value::as_object)
}

fn tool_name(tool: &Value) -> Option<&str> {
    function_of(tool)?.get("name")?.as_str()
}

/// A tool as vLLM hands it to the template (pydantic's `model_dump()`):
/// `type` and `function` first, the function's `name`, `description` and
/// `parameters` always present (null when not given), other fields kept
/// after them.
fn as_vllm_dumps(tool: &Value) -> Value {
    let Some(obj) = tool.as_object() else {
        return tool.clone();
    };
    let mut function = Map::new();
    let given = function_of(tool).cloned().unwrap_or_default();
    for key in ["name", "description", "parameters"] {
        function.insert(key.into(), given.get(key).cloned().unwrap_or(Value::Null));
    }
    for (k, v) in given {
        function.entry(k).or_insert(v);
    }
    let mut out = Map::new();
    out.insert(
        "type".into(),
        obj.get("type")
            .cloned()
            .unwrap_or_else(|| json!("function")),
    );
    out.insert("function".into(), Value::Object(function));
    for (k, v) in obj {
        out.entry(k.clone()).or_insert_with(|| v.clone());
    }
    Value::Object(out)
}

/// vLLM's `check_tool_usage` plus the shape pydantic enforces on `tools`.
pub fn resolve(tools: Option<&Value>, choice: Option<&Value>) -> Result<ToolRequest, ToolError> {
    let tools = tools.filter(|t| !t.is_null());
    if let Some(t) = tools {
        let Some(list) = t.as_array() else {
            return Err(ToolError::InvalidTools {
                message: format!("Invalid value for `tools`: expected a list of tools, got {t}"),
            });
        };
        for (i, tool) in list.iter().enumerate() {
            let kind = tool
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("function");
            if kind != "function" || tool_name(tool).is_none() {
                return Err(ToolError::InvalidTools {
                    message: format!(
                        "Invalid value for `tools[{i}]`: expected {{\"type\": \"function\", \
                         \"function\": {{\"name\": ..., \"parameters\": ...}}}}, got {tool}"
                    ),
                });
            }
            if let Some(p) = function_of(tool).and_then(|f| f.get("parameters")) {
                if !p.is_object() && !p.is_null() {
                    return Err(ToolError::InvalidTools {
                        message: format!(
                            "Invalid value for `tools[{i}].function.parameters`: expected a JSON schema object, got {p}"
                        ),
                    });
                }
            }
        }
    }
    let has_tools = tools
        .and_then(Value::as_array)
        .is_some_and(|l| !l.is_empty());
    let template_tools = tools
        .and_then(Value::as_array)
        .map(|l| Value::Array(l.iter().map(as_vllm_dumps).collect()));
    let request = |choice| ToolRequest {
        choice,
        tools: template_tools.clone(),
    };
    let choice = match choice.filter(|c| !c.is_null()) {
        None if has_tools => return Ok(request(ToolChoice::Auto)),
        None => return Ok(request(ToolChoice::None)),
        Some(Value::String(s)) if s == "none" => return Ok(request(ToolChoice::None)),
        Some(c) => c,
    };
    let Some(tools) = tools else {
        return Err(ToolError::InvalidToolChoice {
            message: "When using `tool_choice`, `tools` must be set.".into(),
        });
    };
    match choice {
        Value::String(s) if s == "auto" => Ok(request(ToolChoice::Auto)),
        // OpenAI's behaviour: `required` with no tools is `none`.
        Value::String(s) if s == "required" && !has_tools => Ok(ToolRequest {
            choice: ToolChoice::None,
            tools: None,
        }),
        Value::String(s) if s == "required" => Ok(request(ToolChoice::Required)),
        Value::Object(obj) => {
            let function = obj.get("function");
            let Some(Value::Object(function)) = function else {
                let shown = function.map_or("None".to_string(), Value::to_string);
                return Err(ToolError::InvalidToolChoice {
                    message: format!(
                        "Invalid value for `function`: `{shown}` in `tool_choice`! {CORRECT_USAGE}"
                    ),
                });
            };
            let Some(name) = function.get("name") else {
                return Err(ToolError::InvalidToolChoice {
                    message: format!(
                        "Expected field `name` in `function` in `tool_choice`! {CORRECT_USAGE}"
                    ),
                });
            };
            let name = match name.as_str() {
                Some(n) if !n.is_empty() => n,
                _ => {
                    let shown = name.as_str().map_or(name.to_string(), str::to_string);
                    return Err(ToolError::InvalidToolChoice {
                        message: format!(
                            "Invalid `name` in `function`: `{shown}` in `tool_choice`! {CORRECT_USAGE}"
                        ),
                    });
                }
            };
            let known = tools
                .as_array()
                .is_some_and(|l| l.iter().any(|t| tool_name(t) == Some(name)));
            if !known {
                return Err(ToolError::InvalidToolChoice {
                    message: "The tool specified in `tool_choice` does not match any of the \
                              specified `tools`"
                        .into(),
                });
            }
            Ok(request(ToolChoice::Named(name.to_string())))
        }
        other => {
            let shown = other.as_str().map_or(other.to_string(), str::to_string);
            Err(ToolError::InvalidToolChoice {
                message: format!(
                    "Invalid value for `tool_choice`: {shown}! Only named tools, \"none\", \
                     \"auto\" or \"required\" are supported."
                ),
            })
        }
    }
}

/// Which parser reads the reply, given the server's settings (vLLM's
/// serving_chat checks). None: the reply is plain content.
pub fn mode(
    request: &ToolRequest,
    enable_auto_tool_choice: bool,
    parser: Option<ToolCallParser>,
) -> Result<Option<ToolMode>, ToolError> {
    Ok(match &request.choice {
        ToolChoice::None => None,
        ToolChoice::Auto => match (enable_auto_tool_choice, parser) {
            // vLLM parses only when there is a tool to call.
            (true, Some(_)) if !has_tools(request) => None,
            (true, Some(p)) => Some(ToolMode::Auto(p)),
            _ => return Err(ToolError::AutoNotEnabled),
        },
        ToolChoice::Required => Some(ToolMode::Required),
        ToolChoice::Named(n) => Some(ToolMode::Named(n.clone())),
    })
}

fn has_tools(request: &ToolRequest) -> bool {
    request
        .tools
        .as_ref()
        .and_then(Value::as_array)
        .is_some_and(|l| !l.is_empty())
}

fn parameters_of(tool: &Value) -> Option<&Value> {
    function_of(tool)?
        .get("parameters")
        .filter(|p| !p.is_null())
}

/// The JSON schema vLLM constrains the output to: for `required`, a
/// non-empty list of `{"name": <one tool's name>, "parameters": <its
/// schema>}` objects (one `anyOf` branch per tool, every tool's `$defs`
/// hoisted to the top); for a named function, that function's parameters.
/// None for `none` and `auto`, which are not constrained.
pub fn tool_schema(request: &ToolRequest) -> Result<Option<Value>, ToolError> {
    let tools = request
        .tools
        .as_ref()
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let empty_object = || json!({"type": "object", "properties": {}});
    match &request.choice {
        ToolChoice::None | ToolChoice::Auto => Ok(None),
        ToolChoice::Named(name) => Ok(Some(
            tools
                .iter()
                .find(|t| tool_name(t) == Some(name))
                .and_then(parameters_of)
                .cloned()
                .unwrap_or_else(empty_object),
        )),
        ToolChoice::Required => {
            let mut defs = Map::new();
            let mut branches = Vec::with_capacity(tools.len());
            for tool in tools {
                let mut params = parameters_of(tool).cloned().unwrap_or_else(empty_object);
                if let Some(Value::Object(d)) =
                    params.as_object_mut().and_then(|p| p.shift_remove("$defs"))
                {
                    for (name, schema) in d {
                        match defs.get(&name) {
                            Some(existing) if *existing != schema => {
                                return Err(ToolError::ConflictingDefs { name })
                            }
                            _ => {
                                defs.insert(name, schema);
                            }
                        }
                    }
                }
                branches.push(json!({
                    "properties": {
                        "name": {"type": "string", "enum": [tool_name(tool).unwrap_or_default()]},
                        "parameters": params,
                    },
                    "required": ["name", "parameters"],
                }));
            }
            let mut schema = json!({
                "type": "array",
                "minItems": 1,
                "items": {"type": "object", "anyOf": branches},
            });
            if !defs.is_empty() {
                schema["$defs"] = Value::Object(defs);
            }
            Ok(Some(schema))
        }
    }
}

/// THE HAND-OFF TO STRUCTURED OUTPUTS. `required` and named tool choices are
/// enforced by constraining generation to `schema` (from [`tool_schema`]),
/// as vLLM does: the schema goes on `params` as a JSON-schema constraint
/// (the engine compiles it; a schema llguidance cannot compile is a 400
/// naming `tool_choice`), and the chat route parses the constrained output
/// into tool calls (`ToolMode::Required` / `ToolMode::Named`), streamed or
/// not. Another constraint on the same request (`response_format`,
/// `guided_*`) is a 400.
pub fn constrain_to_tool_schema(
    params: &mut SamplingParams,
    choice: &ToolChoice,
    schema: Value,
) -> Result<(), ToolError> {
    if let Some(other) = &params.structured_outputs {
        let choice = match choice {
            ToolChoice::Named(name) => format!("naming function '{name}'"),
            _ => "'required'".into(),
        };
        return Err(ToolError::ConflictingConstraint {
            choice,
            other: other.param.clone(),
        });
    }
    params.structured_outputs = Some(StructuredOutputs::new(
        StructuredOutputRequest::JsonSchema(schema),
        "tool_choice",
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                              "required": ["city"]}}})
    }

    fn msg(r: Result<ToolRequest, ToolError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn choices_resolve_as_vllm() {
        let tools = json!([weather()]);
        let r = |c: Value| resolve(Some(&tools), Some(&c));
        assert_eq!(
            resolve(Some(&tools), None).unwrap().choice,
            ToolChoice::Auto
        );
        assert_eq!(resolve(None, None).unwrap().choice, ToolChoice::None);
        assert_eq!(
            resolve(Some(&json!([])), None).unwrap().choice,
            ToolChoice::None
        );
        assert_eq!(r(json!("none")).unwrap().choice, ToolChoice::None);
        assert_eq!(r(json!("none")).unwrap().tools, Some(tools.clone()));
        assert_eq!(r(json!("auto")).unwrap().choice, ToolChoice::Auto);
        assert_eq!(r(json!("required")).unwrap().choice, ToolChoice::Required);
        assert_eq!(
            r(json!({"type": "function", "function": {"name": "get_weather"}}))
                .unwrap()
                .choice,
            ToolChoice::Named("get_weather".into())
        );
        let none = resolve(Some(&json!([])), Some(&json!("required"))).unwrap();
        assert_eq!((none.choice, none.tools), (ToolChoice::None, None));
    }

    #[test]
    fn tools_reach_the_template_as_vllm_dumps_them() {
        let tools = json!([
            {"function": {"strict": true, "name": "ping"}},
            weather(),
        ]);
        let req = resolve(Some(&tools), None).unwrap();
        let got = serde_json::to_string(&req.tools.unwrap()).unwrap();
        let want = json!([
            {"type": "function", "function": {"name": "ping", "description": null,
                                              "parameters": null, "strict": true}},
            weather(),
        ]);
        assert_eq!(got, serde_json::to_string(&want).unwrap());
    }

    #[test]
    fn bad_choices_name_the_problem() {
        let tools = json!([weather()]);
        let r = |c: Value| resolve(Some(&tools), Some(&c));
        assert_eq!(
            msg(resolve(None, Some(&json!("auto")))),
            "When using `tool_choice`, `tools` must be set."
        );
        assert_eq!(
            msg(r(json!("sometimes"))),
            "Invalid value for `tool_choice`: sometimes! Only named tools, \"none\", \"auto\" or \"required\" are supported."
        );
        assert!(
            msg(r(json!({"type": "function"}))).starts_with("Invalid value for `function`: `None`")
        );
        assert!(msg(r(json!({"function": {}}))).starts_with("Expected field `name` in `function`"));
        assert!(msg(r(json!({"function": {"name": ""}})))
            .starts_with("Invalid `name` in `function`: ``"));
        assert_eq!(
            msg(r(json!({"function": {"name": "nope"}}))),
            "The tool specified in `tool_choice` does not match any of the specified `tools`"
        );
        assert!(msg(resolve(Some(&json!({"a": 1})), None)).contains("`tools`"));
        assert!(msg(resolve(Some(&json!([{"type": "function"}])), None)).contains("`tools[0]`"));
    }

    #[test]
    fn auto_needs_the_server_flags() {
        let req = resolve(Some(&json!([weather()])), None).unwrap();
        assert_eq!(mode(&req, false, None), Err(ToolError::AutoNotEnabled));
        assert_eq!(
            mode(&req, false, Some(ToolCallParser::Hermes)),
            Err(ToolError::AutoNotEnabled)
        );
        assert_eq!(
            mode(&req, true, Some(ToolCallParser::Hermes)),
            Ok(Some(ToolMode::Auto(ToolCallParser::Hermes)))
        );
        let empty = resolve(Some(&json!([])), Some(&json!("auto"))).unwrap();
        assert_eq!(mode(&empty, false, None), Err(ToolError::AutoNotEnabled));
        assert_eq!(mode(&empty, true, Some(ToolCallParser::Hermes)), Ok(None));
        assert_eq!(
            ToolError::AutoNotEnabled.to_string(),
            "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set"
        );
    }

    #[test]
    fn errors_are_400_naming_the_field() {
        use crate::openai::ApiError;
        let e = ApiError::from(ToolError::AutoNotEnabled);
        assert_eq!(e.status().as_u16(), 400);
        assert_eq!(e.body()["error"]["param"], "tool_choice");
        assert_eq!(e.body()["error"]["type"], "BadRequestError");
        let e = ApiError::from(ToolError::ConflictingDefs { name: "X".into() });
        assert_eq!(e.param().as_deref(), Some("tools"));
        let mut params = SamplingParams::default();
        constrain_to_tool_schema(&mut params, &ToolChoice::Required, json!({"type": "array"}))
            .unwrap();
        let so = params.structured_outputs.clone().unwrap();
        assert_eq!(
            so.request,
            StructuredOutputRequest::JsonSchema(json!({"type": "array"}))
        );
        assert_eq!(so.param, "tool_choice");
        let e =
            constrain_to_tool_schema(&mut params, &ToolChoice::Required, json!({})).unwrap_err();
        assert_eq!(e.param(), "tool_choice");
        assert_eq!(
            e.to_string(),
            "tool_choice 'required' cannot be combined with tool_choice: both constrain the output"
        );
    }

    #[test]
    fn schemas_as_vllm_builds_them() {
        let search = json!({"type": "function", "function": {"name": "search",
            "parameters": {"type": "object", "properties": {"q": {"$ref": "#/$defs/Q"}},
                           "$defs": {"Q": {"type": "string"}}}}});
        let noparams = json!({"type": "function", "function": {"name": "ping"}});
        let tools = json!([weather(), search, noparams]);
        let req = resolve(Some(&tools), Some(&json!("required"))).unwrap();
        let schema = tool_schema(&req).unwrap().unwrap();
        assert_eq!(
            schema,
            json!({
                "type": "array",
                "minItems": 1,
                "items": {"type": "object", "anyOf": [
                    {"properties": {"name": {"type": "string", "enum": ["get_weather"]},
                                    "parameters": weather()["function"]["parameters"]},
                     "required": ["name", "parameters"]},
                    {"properties": {"name": {"type": "string", "enum": ["search"]},
                                    "parameters": {"type": "object", "properties": {"q": {"$ref": "#/$defs/Q"}}}},
                     "required": ["name", "parameters"]},
                    {"properties": {"name": {"type": "string", "enum": ["ping"]},
                                    "parameters": {"type": "object", "properties": {}}},
                     "required": ["name", "parameters"]},
                ]},
                "$defs": {"Q": {"type": "string"}},
            })
        );
        let named = resolve(
            Some(&tools),
            Some(&json!({"type": "function", "function": {"name": "get_weather"}})),
        )
        .unwrap();
        assert_eq!(
            tool_schema(&named).unwrap(),
            Some(weather()["function"]["parameters"].clone())
        );
        let auto = resolve(Some(&tools), None).unwrap();
        assert_eq!(tool_schema(&auto).unwrap(), None);

        let clash = json!([
            {"type": "function", "function": {"name": "a", "parameters": {"$defs": {"X": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "b", "parameters": {"$defs": {"X": {"type": "integer"}}}}},
        ]);
        let req = resolve(Some(&clash), Some(&json!("required"))).unwrap();
        assert_eq!(
            tool_schema(&req),
            Err(ToolError::ConflictingDefs { name: "X".into() })
        );
    }
}
