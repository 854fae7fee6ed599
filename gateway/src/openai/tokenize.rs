//! `POST /tokenize` and `POST /detokenize` (vLLM's extras).

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;

use super::chat::{render_chat, ChatRenderArgs};
use super::error::{parse_json, ApiError, Result};
use super::protocol::{DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse};
use super::state::SharedState;

pub async fn tokenize(
    State(state): State<SharedState>,
    body: Bytes,
) -> Result<Json<TokenizeResponse>> {
    let req: TokenizeRequest = parse_json(&body)?;
    let st = state.clone();
    let (tokens, want_strs) = tokio::task::spawn_blocking(move || -> Result<(Vec<u32>, bool)> {
        match req {
            TokenizeRequest::Completion(r) => {
                st.check_model(r.model.as_deref())?;
                let ids = st
                    .tokenizer
                    .encode(&r.prompt, r.add_special_tokens.unwrap_or(true))?;
                Ok((ids, r.return_token_strs.unwrap_or(false)))
            }
            TokenizeRequest::Chat(r) => {
                st.check_model(r.model.as_deref())?;
                let rendered = render_chat(
                    &st,
                    ChatRenderArgs {
                        messages: &r.messages,
                        add_generation_prompt: r.add_generation_prompt.unwrap_or(true),
                        continue_final_message: r.continue_final_message.unwrap_or(false),
                        add_special_tokens: r.add_special_tokens.unwrap_or(false),
                        chat_template: r.chat_template.as_deref(),
                        chat_template_kwargs: r.chat_template_kwargs.clone(),
                        tools: r.tools.clone(),
                        documents: None,
                    },
                )?;
                Ok((rendered.token_ids, r.return_token_strs.unwrap_or(false)))
            }
        }
    })
    .await
    .map_err(|e| ApiError::Internal {
        message: format!("tokenize task failed: {e}"),
    })??;
    let token_strs = want_strs.then(|| {
        tokens
            .iter()
            .map(|&t| state.tokenizer.id_to_token(t).unwrap_or_default())
            .collect()
    });
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.max_model_len,
        tokens,
        token_strs,
    }))
}

pub async fn detokenize(
    State(state): State<SharedState>,
    body: Bytes,
) -> Result<Json<DetokenizeResponse>> {
    let req: DetokenizeRequest = parse_json(&body)?;
    state.check_model(req.model.as_deref())?;
    let vocab = state.tokenizer.vocab_size();
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            format!("token id {bad} is out of vocabulary (size {vocab})."),
            Some("tokens"),
        ));
    }
    let prompt = state.tokenizer.decode(&req.tokens, false)?;
    Ok(Json(DetokenizeResponse { prompt }))
}
