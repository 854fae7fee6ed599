//! Chat templates: our minijinja rendering against Python's jinja2 set up as
//! transformers sets it up, plus the OpenAI-message handling around it.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use gateway::chat_template::{ChatTemplate, ChatTemplateError, ContentFormat, RenderOptions};
use gateway::tokenizer::Tokenizer;
use serde_json::{json, Value};

/// jinja2 with transformers' environment: sandboxed, trim_blocks,
/// lstrip_blocks, loop controls, and its tojson / raise_exception /
/// strftime_now helpers.
const PY_RENDER: &str = r#"
import json, sys
from datetime import datetime
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.exceptions import TemplateError

def raise_exception(message):
    raise TemplateError(message)

def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)

def strftime_now(fmt):
    return datetime.now().strftime(fmt)

env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                    extensions=["jinja2.ext.loopcontrols"])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = strftime_now
req = json.load(sys.stdin)
sys.stdout.write(env.from_string(req["template"]).render(**req["context"]))
"#;

/// Python's rendering, or None (after a loud SKIP) without jinja2.
#[allow(clippy::disallowed_methods)] // CI's own variable
fn python_render(template: &str, context: &Value) -> Option<String> {
    let has_jinja = Command::new("python3")
        .args(["-c", "import jinja2"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_jinja {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("python3 with jinja2 is required (pip install -r scripts/requirements.txt)");
        }
        eprintln!("\n*** SKIP: python3 jinja2 not installed; run `bash scripts/setup.sh` ***\n");
        return None;
    }
    let mut child = Command::new("python3")
        .args(["-c", PY_RENDER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let req = json!({"template": template, "context": context});
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

fn conversation() -> Vec<Value> {
    vec![
        json!({"role": "system", "content": "You are terse."}),
        json!({"role": "user", "content": "What is the capital of France?"}),
        json!({"role": "assistant", "content": "Paris."}),
        json!({"role": "user", "content": "And of Japan? 日本 🗾"}),
    ]
}

fn smollm2() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = fixtures::smollm2_gguf()?;
        Some(Tokenizer::load(&path, None).unwrap())
    })
    .as_ref()
}

#[test]
fn smollm2_template_matches_python_jinja2() {
    let Some(tok) = smollm2() else { return };
    let template = ChatTemplate::resolve(None, tok)
        .unwrap()
        .expect("SmolLM2 has a template");
    let opts = RenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    for messages in [conversation(), conversation()[1..].to_vec()] {
        let ours = template
            .render(&messages, ContentFormat::String, &opts)
            .unwrap();
        let ctx = json!({
            "messages": messages,
            "add_generation_prompt": true,
            "bos_token": tok.bos_token(),
            "eos_token": tok.eos_token(),
            "tools": null,
            "documents": null,
        });
        let Some(theirs) = python_render(tok.chat_template().unwrap(), &ctx) else {
            return;
        };
        assert_eq!(ours, theirs);
        assert!(ours.ends_with("<|im_start|>assistant\n"));
    }
}

/// Exercises what HF templates lean on: tojson with indent, loop controls,
/// Python string/dict methods, namespace, whitespace control and
/// lstrip_blocks on indented tags.
const RICH_TEMPLATE: &str = r#"{%- set ns = namespace(system='') -%}
{%- if messages[0].role == 'system' -%}
    {%- set ns.system = messages[0].content.strip() -%}
    {%- set messages = messages[1:] -%}
{%- endif -%}
<sys>{{ ns.system }}</sys>
{% if tools is not none %}
    Tools:
    {% for tool in tools %}
{{ tool | tojson(indent=4) }}
{{ tool | tojson }}
    {% endfor %}
{% endif %}
{% for k, v in meta.items() %}
{{ k }}={{ v }}
{% endfor %}
{{ meta }} {{ meta.alpha }} {{ tools is none }} {{ none }} {{ ["it's", 'q"\\'] }}
{% for message in messages %}
    {% if message.role == 'assistant' and message.content.startswith('skip') %}
        {% continue %}
    {% endif %}
    {% if loop.index > 5 %}{% break %}{% endif %}
<{{ message.role | upper }}>{{ message.content | trim }}{% if not loop.last %}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<ASSISTANT>{% endif %}"#;

#[test]
fn rich_template_matches_python_jinja2() {
    let template = ChatTemplate::new(RICH_TEMPLATE, Some("<s>"), Some("</s>")).unwrap();
    let tools = json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city, e.g. \"Paris\" — or Zürich",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        }
    }]);
    let mut kwargs = serde_json::Map::new();
    kwargs.insert("meta".into(), json!({"zeta": 1, "alpha": [true, null]}));
    let mut messages = conversation();
    messages.insert(3, json!({"role": "assistant", "content": "skip me"}));
    let opts = RenderOptions {
        add_generation_prompt: true,
        tools: Some(tools.clone()),
        chat_template_kwargs: kwargs,
        ..Default::default()
    };
    let ours = template
        .render(&messages, ContentFormat::String, &opts)
        .unwrap();
    let ctx = json!({
        "messages": messages, "add_generation_prompt": true, "tools": tools,
        "documents": null, "bos_token": "<s>", "eos_token": "</s>",
        "meta": {"zeta": 1, "alpha": [true, null]},
    });
    let Some(theirs) = python_render(RICH_TEMPLATE, &ctx) else {
        return;
    };
    assert_eq!(ours, theirs);
    assert!(!ours.contains("skip me"));
    assert!(ours.contains("Zürich"), "tojson keeps non-ASCII: {ours}");
}

const STRING_TEMPLATE: &str = "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}";
const PARTS_TEMPLATE: &str = "{% for m in messages %}[{{ m.role }}]{% for p in m.content %}{% if p.type == 'text' %}<{{ p.text }}>{% endif %}{% endfor %}\n{% endfor %}";

#[test]
fn content_as_string_or_parts() {
    let messages = vec![
        json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
        json!({"role": "assistant", "content": "c"}),
    ];
    let opts = RenderOptions::default();
    let s = ChatTemplate::new(STRING_TEMPLATE, None, None).unwrap();
    assert_eq!(
        s.render(&messages, ContentFormat::String, &opts).unwrap(),
        "[user]a\nb\n[assistant]c\n"
    );
    let p = ChatTemplate::new(PARTS_TEMPLATE, None, None).unwrap();
    assert_eq!(
        p.render(&messages, ContentFormat::OpenAi, &opts).unwrap(),
        // trim_blocks eats the newline after the inner endfor.
        "[user]<a><b>[assistant]<c>"
    );
}

#[test]
fn content_format_is_detected_or_configured() {
    let s = ChatTemplate::new(STRING_TEMPLATE, None, None).unwrap();
    let p = ChatTemplate::new(PARTS_TEMPLATE, None, None).unwrap();
    assert_eq!(s.content_format("auto"), ContentFormat::String);
    assert_eq!(p.content_format("auto"), ContentFormat::OpenAi);
    assert_eq!(p.content_format("string"), ContentFormat::String);
    assert_eq!(s.content_format("openai"), ContentFormat::OpenAi);
    if let Some(tok) = smollm2() {
        let t = ChatTemplate::resolve(None, tok).unwrap().unwrap();
        assert_eq!(t.content_format("auto"), ContentFormat::String);
    }
}

#[test]
fn raise_exception_is_an_error_with_its_message() {
    let t = ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}ok",
        None,
        None,
    )
    .unwrap();
    let err = t
        .render(
            &[json!({"role": "assistant", "content": "x"})],
            ContentFormat::String,
            &RenderOptions::default(),
        )
        .unwrap_err();
    match err {
        ChatTemplateError::Raised { message } => {
            assert_eq!(message, "Conversation must start with a user message")
        }
        other => panic!("expected Raised, got {other:?}"),
    }
}

#[test]
fn continue_final_message_cuts_after_its_content() {
    let Some(tok) = smollm2() else { return };
    let t = ChatTemplate::resolve(None, tok).unwrap().unwrap();
    let messages = vec![
        json!({"role": "user", "content": "Name a city."}),
        json!({"role": "assistant", "content": "The city is"}),
    ];
    let out = t
        .render(
            &messages,
            ContentFormat::String,
            &RenderOptions {
                continue_final_message: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        out.ends_with("<|im_start|>assistant\nThe city is"),
        "{out:?}"
    );
    let both = RenderOptions {
        continue_final_message: true,
        add_generation_prompt: true,
        ..Default::default()
    };
    assert!(matches!(
        t.render(&messages, ContentFormat::String, &both),
        Err(ChatTemplateError::ContinueWithGenerationPrompt)
    ));
}

#[test]
fn chat_template_kwargs_are_visible() {
    let t = ChatTemplate::new(
        "{% if enable_thinking %}<think>{% else %}<no_think>{% endif %}{{ bos_token }}{{ custom | default('none') }}",
        Some("<s>"),
        None,
    )
    .unwrap();
    let mut kwargs = serde_json::Map::new();
    kwargs.insert("enable_thinking".into(), json!(true));
    kwargs.insert("custom".into(), json!("x"));
    let opts = RenderOptions {
        chat_template_kwargs: kwargs,
        ..Default::default()
    };
    assert_eq!(
        t.render(&[], ContentFormat::String, &opts).unwrap(),
        "<think><s>x"
    );
    assert_eq!(
        t.render(&[], ContentFormat::String, &RenderOptions::default())
            .unwrap(),
        "<no_think><s>none"
    );
}

#[test]
fn bad_templates_and_arguments_are_clear_errors() {
    let e = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
    assert!(matches!(e, ChatTemplateError::Syntax { .. }), "{e}");
    let Some(tok) = smollm2() else { return };
    let e = ChatTemplate::resolve(Some("/no/such/template.jinja"), tok).unwrap_err();
    assert!(e.to_string().contains("/no/such/template.jinja"), "{e}");
    let inline = ChatTemplate::resolve(Some("{{ messages[0].content }}!"), tok)
        .unwrap()
        .unwrap();
    let out = inline
        .render(
            &[json!({"role": "user", "content": "hi"})],
            ContentFormat::String,
            &RenderOptions::default(),
        )
        .unwrap();
    assert_eq!(out, "hi!");
    let dir = std::env::temp_dir().join(format!("flotilla-tpl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("t.jinja");
    std::fs::write(&file, "<{{ messages | length }}>").unwrap();
    let from_file = ChatTemplate::resolve(Some(file.to_str().unwrap()), tok)
        .unwrap()
        .unwrap();
    assert_eq!(
        from_file
            .render(&[], ContentFormat::String, &RenderOptions::default())
            .unwrap(),
        "<0>"
    );
    std::fs::remove_dir_all(&dir).ok();
}
