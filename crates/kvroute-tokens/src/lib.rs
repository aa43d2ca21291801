//! Prompt → block hashes.
//!
//! Owns the two ways kvroute names a prompt's KV-cache blocks: [`BlockHasher`] chains hashes
//! of token-id blocks (what a model server's prefix cache holds, for precise routing), and
//! [`ApproxHasher`] chains hashes of fixed-size chunks of the prompt's text (for approximate
//! routing when no tokenizer is at hand). Both are pure functions: no I/O, no runtime.
//!
//! Hash function: XXH3-64, seeded with the parent block's hash, so each block's hash covers
//! every block before it. 64 bits suffice: see `docs/index.md` ("Collisions").
//!
//! [`ModelTokenizer`] turns a prompt into the token ids the model server computes: the
//! model's `tokenizer.json`, its chat template, and a cache of text segments between special
//! tokens. It is built from file contents; reading files is the caller's.

mod approx;
mod blocks;
mod model;

pub use approx::{ApproxHasher, DEFAULT_CHUNK_BYTES, DEFAULT_MAX_BLOCKS};
pub use blocks::{BlockHasher, ExtraKeys};
pub use model::{ModelTokenizer, TokensError};
