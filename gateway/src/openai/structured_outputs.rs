//! From a request's structured-output fields to the one constraint the
//! engine enforces, as vLLM reads them: `response_format`
//! (`json_object`, `json_schema`), the `structured_outputs` object (`json`,
//! `regex`, `choice`, `grammar`, `json_object`, `whitespace_pattern`,
//! `disable_any_whitespace`) and
//! the older `guided_json`, `guided_regex`, `guided_choice`,
//! `guided_grammar`, `guided_whitespace_pattern`. More than one constraint
//! is a 400, as in vLLM.

use serde_json::Value;
use worker::sampling_params::{StructuredOutputRequest, StructuredOutputs};

use super::error::{ApiError, Result};
use super::protocol::SamplingFields;

/// The llguidance backend is the only one; vLLM's names for it (and
/// `auto`) are accepted.
const BACKENDS: &[&str] = &["auto", "guidance", "llguidance"];

/// The constraint the request asks for, if any.
pub fn from_fields(fields: &SamplingFields) -> Result<Option<StructuredOutputs>> {
    if let Some(b) = &fields.guided_decoding_backend {
        if !BACKENDS.contains(&b.as_str()) {
            return Err(ApiError::invalid(
                format!(
                    "guided_decoding_backend {b:?} is not available: this server uses llguidance \
                     (accepted: {}).",
                    BACKENDS.join(", ")
                ),
                Some("guided_decoding_backend"),
            ));
        }
    }
    // (field name, constraint) for every constraint present.
    let mut found: Vec<(String, StructuredOutputRequest)> = Vec::new();
    let mut whitespace = fields.guided_whitespace_pattern.clone();
    let mut disable_any_whitespace = false;
    if let Some(v) = &fields.guided_json {
        found.push((
            "guided_json".into(),
            StructuredOutputRequest::JsonSchema(v.clone()),
        ));
    }
    if let Some(v) = &fields.guided_regex {
        found.push((
            "guided_regex".into(),
            StructuredOutputRequest::Regex(v.clone()),
        ));
    }
    if let Some(v) = &fields.guided_choice {
        found.push((
            "guided_choice".into(),
            StructuredOutputRequest::Choice(v.clone()),
        ));
    }
    if let Some(v) = &fields.guided_grammar {
        found.push((
            "guided_grammar".into(),
            StructuredOutputRequest::Grammar(v.clone()),
        ));
    }
    if let Some(so) = &fields.structured_outputs {
        let (constraints, ws, no_ws) = structured_outputs_object(so)?;
        found.extend(constraints);
        disable_any_whitespace = no_ws;
        if ws.is_some() {
            whitespace = ws;
        }
    }
    if let Some(rf) = &fields.response_format {
        if let Some(c) = response_format(rf)? {
            found.push(("response_format".into(), c));
        }
    }
    match found.len() {
        0 => {
            if whitespace.is_some() {
                return Err(ApiError::invalid(
                    "guided_whitespace_pattern needs a JSON constraint (guided_json, \
                     structured_outputs.json, or response_format).",
                    Some("guided_whitespace_pattern"),
                ));
            }
            Ok(None)
        }
        1 => {
            let (param, request) = found.pop().expect("one constraint");
            Ok(Some(StructuredOutputs {
                request,
                whitespace_pattern: whitespace,
                disable_any_whitespace,
                param,
            }))
        }
        _ => {
            let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
            Err(ApiError::invalid(
                format!(
                    "You can only use one kind of structured outputs constraint but multiple \
                     are specified: {}.",
                    names.join(", ")
                ),
                Some(found[1].0.as_str()),
            ))
        }
    }
}

/// The constraints (field, constraint) a `structured_outputs` object
/// holds, its whitespace pattern and whether it disables whitespace.
type ObjectConstraints = (Vec<(String, StructuredOutputRequest)>, Option<String>, bool);

/// The constraints a `structured_outputs` object holds.
fn structured_outputs_object(so: &Value) -> Result<ObjectConstraints> {
    let obj = so.as_object().ok_or_else(|| {
        ApiError::invalid(
            format!("structured_outputs must be an object, got {so}."),
            Some("structured_outputs"),
        )
    })?;
    let bad = |key: &str, what: &str| {
        ApiError::invalid(
            format!("structured_outputs.{key} must be {what}."),
            Some(format!("structured_outputs.{key}").as_str()),
        )
    };
    let mut found = Vec::new();
    let mut whitespace = None;
    let mut disable_ws = false;
    for (key, v) in obj {
        if v.is_null() {
            continue;
        }
        let param = format!("structured_outputs.{key}");
        match key.as_str() {
            "json" => found.push((param, StructuredOutputRequest::JsonSchema(v.clone()))),
            "regex" => {
                let rx = v.as_str().ok_or_else(|| bad(key, "a string"))?;
                found.push((param, StructuredOutputRequest::Regex(rx.to_string())));
            }
            "choice" => {
                let choices = v
                    .as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|c| c.as_str().map(str::to_string))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| bad(key, "a list of strings"))?;
                found.push((param, StructuredOutputRequest::Choice(choices)));
            }
            "grammar" => {
                let g = v.as_str().ok_or_else(|| bad(key, "a string"))?;
                found.push((param, StructuredOutputRequest::Grammar(g.to_string())));
            }
            "json_object" => {
                if v.as_bool().ok_or_else(|| bad(key, "a boolean"))? {
                    found.push((param, StructuredOutputRequest::JsonObject));
                }
            }
            "whitespace_pattern" => {
                let p = v.as_str().ok_or_else(|| bad(key, "a string"))?;
                whitespace = Some(p.to_string());
            }
            // Settings of vLLM's other backends, meaningless for llguidance.
            "disable_fallback" => {}
            "disable_any_whitespace" => {
                disable_ws = v.as_bool().ok_or_else(|| bad(key, "a boolean"))?;
            }
            "disable_additional_properties" => {
                if v.as_bool().ok_or_else(|| bad(key, "a boolean"))? {
                    return Err(ApiError::NotSupported {
                        feature: "structured_outputs.disable_additional_properties",
                        param: "structured_outputs.disable_additional_properties",
                        detail: " yet: write additionalProperties: false in the schema.".into(),
                    });
                }
            }
            "structural_tag" => {
                return Err(ApiError::NotSupported {
                    feature: "structured_outputs.structural_tag",
                    param: "structured_outputs",
                    detail: " yet.".into(),
                })
            }
            other => {
                return Err(ApiError::invalid(
                    format!(
                        "Unknown field structured_outputs.{other}: expected json, regex, choice, \
                         grammar, json_object or whitespace_pattern."
                    ),
                    Some(param.as_str()),
                ))
            }
        }
    }
    Ok((found, whitespace, disable_ws))
}

/// `response_format`: `text` (no constraint), `json_object`, `json_schema`.
fn response_format(rf: &Value) -> Result<Option<StructuredOutputRequest>> {
    let kind = rf.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            format!("response_format must be an object with a string `type`, got {rf}."),
            Some("response_format"),
        )
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(StructuredOutputRequest::JsonObject)),
        "json_schema" => {
            let schema = rf
                .get("json_schema")
                .and_then(|js| js.get("schema"))
                .filter(|s| !s.is_null())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format of type json_schema needs json_schema.schema.",
                        Some("response_format.json_schema"),
                    )
                })?;
            Ok(Some(StructuredOutputRequest::JsonSchema(schema.clone())))
        }
        "structural_tag" => Err(ApiError::NotSupported {
            feature: "response_format of type structural_tag",
            param: "response_format",
            detail: " yet.".into(),
        }),
        other => Err(ApiError::invalid(
            format!(
                "response_format.type must be one of text, json_object, json_schema; got \
                 {other:?}."
            ),
            Some("response_format.type"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Option<StructuredOutputs>> {
        let fields: SamplingFields = serde_json::from_value(v).unwrap();
        from_fields(&fields)
    }

    fn request(v: Value) -> (String, StructuredOutputRequest, Option<String>) {
        let so = parse(v).unwrap().expect("a constraint");
        (so.param, so.request, so.whitespace_pattern)
    }

    #[test]
    fn every_request_form_becomes_one_constraint() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let cases = vec![
            (
                json!({"guided_json": schema}),
                "guided_json",
                StructuredOutputRequest::JsonSchema(schema.clone()),
            ),
            (
                json!({"guided_regex": "[a-z]+"}),
                "guided_regex",
                StructuredOutputRequest::Regex("[a-z]+".into()),
            ),
            (
                json!({"guided_choice": ["yes", "no"]}),
                "guided_choice",
                StructuredOutputRequest::Choice(vec!["yes".into(), "no".into()]),
            ),
            (
                json!({"guided_grammar": "start: \"a\""}),
                "guided_grammar",
                StructuredOutputRequest::Grammar("start: \"a\"".into()),
            ),
            (
                json!({"structured_outputs": {"json": schema}}),
                "structured_outputs.json",
                StructuredOutputRequest::JsonSchema(schema.clone()),
            ),
            (
                json!({"structured_outputs": {"regex": "x"}}),
                "structured_outputs.regex",
                StructuredOutputRequest::Regex("x".into()),
            ),
            (
                json!({"structured_outputs": {"choice": ["a"]}}),
                "structured_outputs.choice",
                StructuredOutputRequest::Choice(vec!["a".into()]),
            ),
            (
                json!({"structured_outputs": {"grammar": "start: \"a\""}}),
                "structured_outputs.grammar",
                StructuredOutputRequest::Grammar("start: \"a\"".into()),
            ),
            (
                json!({"structured_outputs": {"json_object": true}}),
                "structured_outputs.json_object",
                StructuredOutputRequest::JsonObject,
            ),
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
                StructuredOutputRequest::JsonObject,
            ),
            (
                json!({"response_format": {"type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema, "strict": true}}}),
                "response_format",
                StructuredOutputRequest::JsonSchema(schema.clone()),
            ),
        ];
        for (body, param, want) in cases {
            let (p, r, _) = request(body.clone());
            assert_eq!((p.as_str(), r), (param, want), "{body}");
        }
        assert!(parse(json!({"response_format": {"type": "text"}}))
            .unwrap()
            .is_none());
        assert!(parse(json!({})).unwrap().is_none());
        assert!(parse(json!({"structured_outputs": {"json_object": false}}))
            .unwrap()
            .is_none());
        let (_, _, ws) =
            request(json!({"guided_json": schema, "guided_whitespace_pattern": "[ ]?"}));
        assert_eq!(ws.as_deref(), Some("[ ]?"));
        let (_, _, ws) =
            request(json!({"structured_outputs": {"json": schema, "whitespace_pattern": " "}}));
        assert_eq!(ws.as_deref(), Some(" "));
        let so = parse(
            json!({"structured_outputs": {"json_object": true, "disable_any_whitespace": true}}),
        )
        .unwrap()
        .unwrap();
        assert!(so.disable_any_whitespace);
    }

    #[test]
    fn conflicts_and_bad_shapes_are_400s_naming_the_field() {
        let cases = vec![
            (
                json!({"guided_json": {}, "guided_regex": "a"}),
                "guided_regex",
                "only use one kind",
            ),
            (
                json!({"guided_choice": ["a"], "response_format": {"type": "json_object"}}),
                "response_format",
                "only use one kind",
            ),
            (
                json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}),
                "structured_outputs.choice",
                "only use one kind",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format.json_schema",
                "needs json_schema.schema",
            ),
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format.type",
                "must be one of",
            ),
            (
                json!({"structured_outputs": {"regex": 3}}),
                "structured_outputs.regex",
                "must be a string",
            ),
            (
                json!({"structured_outputs": {"nope": 1}}),
                "structured_outputs.nope",
                "Unknown field",
            ),
            (
                json!({"guided_whitespace_pattern": " "}),
                "guided_whitespace_pattern",
                "needs a JSON constraint",
            ),
            (
                json!({"guided_json": {}, "guided_decoding_backend": "xgrammar"}),
                "guided_decoding_backend",
                "llguidance",
            ),
        ];
        for (body, param, text) in cases {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!(e.status().as_u16(), 400, "{body}");
            assert_eq!(e.param().as_deref(), Some(param), "{body}");
            assert!(e.to_string().contains(text), "{body}: {e}");
        }
        let e = parse(json!({"response_format": {"type": "structural_tag"}})).unwrap_err();
        assert_eq!(e.status().as_u16(), 400);
    }
}
