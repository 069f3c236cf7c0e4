//! What turns a user's image and question into model inputs: [`image`] tiles and normalises
//! pictures exactly as the released pipeline does, [`prompt`] renders the backbone's chat
//! template with the image placeholders expanded, [`tokenizer`] wraps the `tokenizers`
//! crate with a streaming detokeniser, and [`sentencepiece`] converts the SentencePiece
//! `tokenizer.model` of the InternLM2 sizes into a `tokenizer.json` once. [`inputs`] is the one
//! path from a conversation and its pictures to model inputs that every caller shares.

pub mod image;
pub mod inputs;
pub mod prompt;
pub mod sentencepiece;
pub mod tokenizer;
