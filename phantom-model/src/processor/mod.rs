//! What turns a user's image and question into model inputs: [`image`] tiles and normalises
//! pictures exactly as the released pipeline does, [`prompt`] renders the backbone's chat
//! template with the image placeholders expanded, and [`tokenizer`] wraps the `tokenizers`
//! crate with a streaming detokeniser.

pub mod image;
pub mod prompt;
pub mod tokenizer;
