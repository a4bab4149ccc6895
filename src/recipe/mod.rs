//! Recipes: the TOML file that describes a whole fine-tuning job.
//!
//! [`load`] reads a recipe and the chain of files it `extends`, applies `--set` overrides,
//! deserialises it strictly into [`Recipe`] (unknown keys and wrong types are errors) and
//! checks every range and cross-field rule, before any weight is touched. Every error names
//! the file, line and column (or the `--set` argument) of the offending value and says what
//! would be valid. The schema, with each key's default and the ms-swift flag it replaces, is
//! in [`Recipe`] and its sections.

pub mod explain;
mod keys;
mod load;
mod schema;
mod validate;

pub use load::{load, LoadedRecipe};
pub use schema::*;

/// A recipe that cannot be used as written. The message carries its own location
/// (`FILE:LINE:COL: ...` or `--set KEY=VALUE: ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RecipeError(pub String);

/// Check a recipe built in code (no file, so errors name only the key) and fill in derived
/// defaults (`train.global_batch_size`). [`load`] runs the same checks.
pub fn validate(recipe: Recipe) -> Result<Recipe, RecipeError> {
    validate::check(recipe).map_err(|p| RecipeError(format!("key `{}`: {}", p.key, p.message)))
}
