//! trainer: declarative LLM fine-tuning on Burn.
//!
//! A TOML [`recipe`] describes the job; [`model`] compiles it into a Burn module tree for a
//! registered family; [`parallel`] says how layers split across ranks; [`backend`] picks the
//! device; [`train`] runs the job in a [`run`] folder and [`export`] turns its checkpoints into
//! Hugging Face / peft folders. Hot-path operations live in the `kernels-cubecl` crate.

pub mod backend;
pub mod cli;
pub mod data;
pub mod error;
pub mod export;
pub mod infer;
pub mod lora;
pub mod model;
pub mod parallel;
pub mod recipe;
pub mod run;
pub mod train;

pub use error::{Error, Result};
