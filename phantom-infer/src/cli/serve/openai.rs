//! The OpenAI chat-completions request, as far as a Phantom model can honour it, and the
//! OpenAI-shaped answers and errors.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use phantom_model::processor::prompt::{IMAGE_PLACEHOLDER, Turn};
use serde::Deserialize;
use serde_json::{Value, json};

/// A refusal in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A short machine-readable code.
    pub code: &'static str,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.to_string()),
            code: "invalid_value",
        }
    }

    /// Any status with a code and no parameter.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 | 403 => "authentication_error",
            404 => "not_found_error",
            413 => "invalid_request_error",
            429 | 503 => "server_overloaded",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

/// `POST /v1/chat/completions`, the fields this server reads (others are ignored, as OpenAI's
/// optional fields may be).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Accepted and echoed; the server has one model.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<Message>,
    /// 0 is greedy (the default, as the paper evaluates).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (an extension OpenAI lacks, common in local servers).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Most new tokens (legacy name).
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Most new tokens.
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    /// Stop sequences: one string or up to four.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Sampler seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Answers wanted; only 1 is served.
    #[serde(default)]
    pub n: Option<usize>,
    /// Phantom: beam search width (the paper evaluates with 3).
    #[serde(default)]
    pub num_beams: Option<usize>,
    /// Phantom: most 448×448 tiles per image (1–6).
    #[serde(default)]
    pub max_tiles: Option<usize>,
    /// Phantom: penalty for tokens already seen.
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Keep going past the end-of-answer token until `max_tokens` (as vLLM's `ignore_eos`):
    /// for benchmarks that need answers of a fixed length.
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One sequence.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    /// The sequences.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the token counts.
    #[serde(default)]
    pub include_usage: bool,
}

/// One message.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (`developer` counts as `system`).
    pub role: String,
    /// A string, or a list of parts.
    #[serde(default)]
    pub content: Option<Content>,
}

/// A message's content.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text and image parts.
    Parts(Vec<Part>),
}

/// One part of a message.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// A picture, by URL.
    ImageUrl {
        /// `{"url": ...}`.
        image_url: ImageUrl,
    },
}

/// `image_url`.
#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    /// A `data:image/...;base64,` URL (or `http(s)` where the server allows it).
    pub url: String,
}

/// A picture a request refers to, before decoding.
#[derive(Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// The bytes of a data URL.
    Bytes(Vec<u8>),
    /// An `http(s)` URL.
    Remote(String),
}

/// The conversation a request describes.
#[derive(Debug, PartialEq, Eq)]
pub struct Conversation {
    /// The system messages, joined.
    pub system: Option<String>,
    /// The exchanges, the last one a question.
    pub turns: Vec<Turn>,
    /// The pictures, in order of appearance (each placed in its question as `<image>`).
    pub images: Vec<ImageSource>,
}

/// Limits on what one request may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most messages.
    pub max_messages: usize,
    /// Most pictures.
    pub max_images: usize,
    /// Most bytes of one picture.
    pub max_image_bytes: usize,
}

/// Decodes a `data:` URL's payload, refusing anything but base64 images within the limit.
fn data_url(url: &str, max_bytes: usize, param: &str) -> Result<Vec<u8>, ApiError> {
    let rest = &url["data:".len()..];
    let (meta, payload) = rest
        .split_once(',')
        .ok_or_else(|| ApiError::invalid(param, "a data URL needs a comma before its payload"))?;
    if !meta.starts_with("image/") || !meta.ends_with(";base64") {
        return Err(ApiError::invalid(
            param,
            "only base64 image data URLs are accepted (data:image/...;base64,...)",
        ));
    }
    // Base64 is 4/3 the size of what it encodes: refuse before decoding anything too large.
    if payload.len() / 4 * 3 > max_bytes + 3 {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("an image is larger than the limit of {max_bytes} bytes"),
            param: Some(param.to_string()),
            code: "image_too_large",
        });
    }
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::invalid(param, format!("the image's base64 is malformed: {e}")))
}

/// The text of a message's content; image parts become `<image>` placeholders and are
/// collected into `images`.
fn content_text(
    content: Option<Content>,
    images: &mut Vec<ImageSource>,
    limits: Limits,
    index: usize,
    allow_images: bool,
) -> Result<String, ApiError> {
    let param = format!("messages[{index}].content");
    match content {
        None => Ok(String::new()),
        Some(Content::Text(text)) => Ok(text),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for part in parts {
                match part {
                    Part::Text { text: t } => text.push_str(&t),
                    Part::ImageUrl { image_url } => {
                        if !allow_images {
                            return Err(ApiError::invalid(
                                &param,
                                "only user messages may hold images",
                            ));
                        }
                        if images.len() == limits.max_images {
                            return Err(ApiError::invalid(
                                &param,
                                format!("at most {} images per request", limits.max_images),
                            ));
                        }
                        let url = image_url.url;
                        let source = if url.starts_with("data:") {
                            ImageSource::Bytes(data_url(&url, limits.max_image_bytes, &param)?)
                        } else if url.starts_with("http://") || url.starts_with("https://") {
                            ImageSource::Remote(url)
                        } else {
                            return Err(ApiError::invalid(
                                &param,
                                "an image URL must be a data:image/...;base64 URL (or http(s) \
                                 where the server allows remote images; file: never)",
                            ));
                        };
                        images.push(source);
                        text.push_str(IMAGE_PLACEHOLDER);
                    }
                }
            }
            Ok(text)
        }
    }
}

/// The conversation of a request: system messages first, then user and assistant messages
/// alternating, ending with a user message.
pub fn conversation(messages: Vec<Message>, limits: Limits) -> Result<Conversation, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    if messages.len() > limits.max_messages {
        return Err(ApiError::invalid(
            "messages",
            format!("at most {} messages per request", limits.max_messages),
        ));
    }
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    let mut images = Vec::new();
    for (i, message) in messages.into_iter().enumerate() {
        let role = message.role.as_str();
        match role {
            "system" | "developer" => {
                if !turns.is_empty() {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].role"),
                        "system messages must come before the conversation",
                    ));
                }
                system.push(content_text(
                    message.content,
                    &mut images,
                    limits,
                    i,
                    false,
                )?);
            }
            "user" => {
                if turns.last().is_some_and(|t| t.assistant.is_none()) {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].role"),
                        "two user messages in a row: the template alternates user and assistant",
                    ));
                }
                let text = content_text(message.content, &mut images, limits, i, true)?;
                turns.push(Turn::question(text));
            }
            "assistant" => {
                let text = content_text(message.content, &mut images, limits, i, false)?;
                match turns.last_mut() {
                    Some(turn) if turn.assistant.is_none() => turn.assistant = Some(text),
                    _ => {
                        return Err(ApiError::invalid(
                            &format!("messages[{i}].role"),
                            "an assistant message must answer a user message",
                        ));
                    }
                }
            }
            other => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("unknown role `{other}` (system, user or assistant)"),
                ));
            }
        }
    }
    if turns.last().is_none_or(|t| t.assistant.is_some()) {
        return Err(ApiError::invalid(
            "messages",
            "the last message must be the user's",
        ));
    }
    Ok(Conversation {
        system: (!system.is_empty()).then(|| system.join("\n")),
        turns,
        images,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_messages: 8,
            max_images: 2,
            max_image_bytes: 1000,
        }
    }

    fn parse(body: Value) -> Result<Conversation, ApiError> {
        let request: ChatRequest = serde_json::from_value(body).expect("request");
        conversation(request.messages, limits())
    }

    #[test]
    fn messages_become_turns_with_placed_images() {
        let png = base64::engine::general_purpose::STANDARD.encode([1u8, 2, 3]);
        let got = parse(json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is "},
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}},
                {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": "Which colour?"}
        ]}))
        .unwrap();
        assert_eq!(got.system.as_deref(), Some("Be brief."));
        assert_eq!(
            got.turns,
            vec![
                Turn::answered("What is <image>?", "A square."),
                Turn::question("Which colour?")
            ]
        );
        assert_eq!(got.images, vec![ImageSource::Bytes(vec![1, 2, 3])]);
    }

    #[test]
    fn malformed_conversations_are_refused_naming_the_field() {
        let cases = [
            (json!({"messages": []}), "messages"),
            (
                json!({"messages": [{"role": "assistant", "content": "hi"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
                "messages[1].role",
            ),
            (
                json!({"messages": [{"role": "robot", "content": "a"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}]}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}]}),
                "messages[0].content",
            ),
        ];
        for (body, param) in cases {
            let err = parse(body.clone()).expect_err(&body.to_string());
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {}", err.message);
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
        }
        let big = "A".repeat(4000);
        let err = parse(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{big}")}}]}]}))
        .unwrap_err();
        assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE);
        let body = err.body();
        assert_eq!(body["error"]["code"], "image_too_large");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
}
