//! Recipes: the TOML file that describes a whole fine-tuning job.
//!
//! [`load`] reads a recipe and the chain of files it `extends`, applies `--set` overrides,
//! deserialises it strictly into [`Recipe`] and checks the cross-field rules, before any weight
//! is touched. Every error names the file and line (or the `--set` argument) of the offending
//! key and says what would be valid.

mod load;
mod schema;
mod validate;

pub use load::{load, LoadedRecipe};
pub use schema::*;

/// A recipe that cannot be used as written. The message carries its own location.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct RecipeError(pub String);
