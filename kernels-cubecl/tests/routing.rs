//! The routed slots' layout (`expert_rows`): the CubeCL kernel (wgpu here: lavapipe on machines
//! without a GPU; CUDA in the ignored test) against the host definition, for odd expert counts,
//! top-k of 1 to 8, experts with no slot, more slots than a cube has units several times over
//! (uneven runs), and choices read through strides.

use burn::backend::wgpu::{CubeBackend, WgpuDevice, WgpuRuntime};
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use kernels_cubecl::{reference_expert_rows, ExpertRoutingBackend, ExpertRows};

type Wgpu = CubeBackend<WgpuRuntime, f32, i32, u32>;

/// Each token's `top_k` distinct experts, drawn with a skew (low experts more often, the last
/// `idle` never), as routers draw them.
fn choices(tokens: usize, top_k: usize, experts: usize, idle: usize, seed: u64) -> Vec<i64> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33
    };
    let live = experts - idle;
    let mut out = Vec::with_capacity(tokens * top_k);
    for _ in 0..tokens {
        let mut picked: Vec<i64> = Vec::new();
        while picked.len() < top_k {
            let r = next() as usize;
            // Squared uniform: skewed toward expert 0.
            let u = (r % 1000) as f64 / 1000.0;
            let e = ((u * u) * live as f64) as i64;
            if !picked.contains(&e) {
                picked.push(e);
            }
        }
        out.extend(picked);
    }
    out
}

fn ints<B: Backend>(t: Tensor<B, 1, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec().unwrap()
}

fn check<B: ExpertRoutingBackend>(chosen: Tensor<B, 2, Int>, experts: usize, case: &str) {
    let host: Vec<i64> = chosen.clone().into_data().convert::<i64>().to_vec().unwrap();
    let [tokens, top_k] = chosen.dims();
    let want = reference_expert_rows(Tensor::<NdArray, 2, Int>::from_data(TensorData::new(host, [tokens, top_k]), &Default::default()), experts);
    let got: ExpertRows<B> = B::expert_rows(chosen, experts);
    assert_eq!(ints(got.counts), ints(want.counts), "{case}: counts");
    assert_eq!(ints(got.slot_row), ints(want.slot_row), "{case}: slot_row");
    assert_eq!(ints(got.row_slot), ints(want.row_slot), "{case}: row_slot");
    assert_eq!(ints(got.row_token), ints(want.row_token), "{case}: row_token");
}

fn cases<B: ExpertRoutingBackend>(device: &B::Device) {
    for (tokens, top_k, experts, idle) in [(1, 1, 1, 0), (5, 2, 3, 0), (37, 2, 7, 2), (300, 8, 13, 4), (1031, 8, 128, 9), (2049, 1, 5, 1), (4096, 4, 60, 0)] {
        for seed in [1, 2] {
            let values = choices(tokens, top_k, experts, idle, seed);
            let case = format!("{tokens} tokens, top {top_k} of {experts} experts ({idle} idle), seed {seed}");
            let chosen = Tensor::<B, 2, Int>::from_data(TensorData::new(values.clone(), [tokens, top_k]), device);
            check(chosen, experts, &case);
            // The same choices read through strides: the transpose of a [top_k, tokens] tensor.
            let mut transposed = vec![0i64; values.len()];
            for t in 0..tokens {
                for j in 0..top_k {
                    transposed[j * tokens + t] = values[t * top_k + j];
                }
            }
            let strided = Tensor::<B, 2, Int>::from_data(TensorData::new(transposed, [top_k, tokens]), device).transpose();
            check(strided, experts, &format!("{case}, strided"));
        }
    }
}

#[test]
fn wgpu_expert_rows_match_the_host_layout() {
    cases::<Wgpu>(&WgpuDevice::default());
}

#[test]
fn host_layout_on_ndarray_is_its_own_reference() {
    cases::<NdArray>(&Default::default());
}

#[cfg(feature = "cuda")]
mod cuda {
    use burn::backend::cuda::{Cuda, CudaDevice};

    /// On the GPU machine: `cargo test --release --features cuda -p kernels-cubecl --test routing -- --ignored`.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_expert_rows_match_the_host_layout() {
        super::cases::<Cuda<burn::tensor::bf16, i32>>(&CudaDevice::default());
        // Qwen3-30B-A3B's shape: 8192 tokens, top 8 of 128.
        let values = super::choices(8192, 8, 128, 3, 7);
        let chosen = burn::tensor::Tensor::<Cuda<burn::tensor::bf16, i32>, 2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(values, [8192, 8]), &CudaDevice::default());
        super::check(chosen, 128, "8192 tokens, top 8 of 128");
    }
}
