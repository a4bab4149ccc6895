//! Hot-path operations of trainer's models.
//!
//! Each operation has a plain-Burn **reference** (in [`reference`]) that runs on every backend
//! and defines the maths; the model calls the operations only through this crate, so a fused
//! CubeCL kernel can replace a reference per backend without the model changing. Every kernel
//! that lands here is tested forward and backward against its reference.
//!
//! Precision policy, as in transformers: normalisation statistics, softmax and cross-entropy are
//! computed in f32 whatever the storage dtype, then cast back.

pub mod attention;
#[cfg(feature = "cubecl")]
mod cube;
#[cfg(feature = "cubecl")]
pub use cube::gemm::{cubecl_gemm, cubecl_gemm_batched, GemmRuntime};
#[cfg(feature = "cubecl")]
pub use cube::UploadRuntime;
#[cfg(feature = "cuda")]
pub use cube::cublas::{gemm_host_syncs, gemm_ordering};
#[cfg(feature = "cuda")]
pub use cube::nccl::{abort_all as nccl_abort_all, unique_id as nccl_unique_id, NcclComm, NcclReduce};
pub mod device;
pub mod gate_up;
pub mod grouped;
pub mod linear;
pub mod lora_linear;
pub mod layer_ops;
pub mod linear_cross_entropy;
pub mod optimizer;
pub mod qkv;
pub mod reference;
pub mod residual_norm;
pub mod routing;

pub use attention::{
    memory_efficient_attention, AttentionForward, AttentionGrads, AttentionKernel, AttentionOptions, AttentionWanted, FusedAttentionBackend,
};
pub use device::{host_float_from_fill, parallel_for, DeviceMemory, DeviceMemoryBackend, Fill};
pub use gate_up::fused_swiglu_packed;
pub use grouped::{gemm_grouped_outer_spread, reference_gemm_grouped, reference_gemm_grouped_outer};
pub use layer_ops::{fused_rms_norm, fused_rotary, fused_swiglu, FusedLayerBackend, NormWanted};
pub use linear::{reference_gemm, reference_gemm_scaled, LinearBackend};
pub use linear_cross_entropy::{
    fused_linear_cross_entropy, FusedCrossEntropyBackend, LinearCrossEntropyOptions, LinearCrossEntropyParts,
    WantedGrads,
};
pub use lora_linear::{lora_forward, DropoutMask, LoraFactors};
pub use optimizer::{AdamWStep, AdamWTensors, AdamWUpdated, FusedOptimizerBackend};
pub use qkv::{qkv_attention, qkv_rotary, QkvLayout};
pub use residual_norm::fused_add_rms_norm;
pub use routing::{reference_expert_rows, ExpertRoutingBackend, ExpertRows};

pub use reference::{
    attention, attention_mask, causal_attention, cross_entropy, linear_cross_entropy, rms_norm, rope_cos_sin, rotary, swiglu,
    CrossEntropy,
};
