//! [`crate::memory_efficient_attention`] on `CubeBackend`: the trait's blockwise implementation
//! with its batched matmuls on the runtime's GEMM (cuBLAS on CUDA, `gemm.rs`), and
//! each query block's softmax, forward and backward, as one row kernel
//! ([`super::softmax_rows`]) instead of Burn's chain of element-wise passes over f32 scores.

use burn::tensor::{Bool, DType, Shape, Tensor, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::CubeDim;

use super::flash::Pass;
use super::{cube_tensor, f32_tensor, float};
use super::row_kernel::{row_cubes, row_units};
use super::softmax_rows::{softmax_grad_rows, softmax_rows, MAX_ROW_UNITS};
use crate::attention::{
    block_softmax, block_softmax_grad, blockwise_backward, blockwise_forward, AttentionForward, AttentionGrads, AttentionKernel, AttentionOptions,
    AttentionWanted, FusedAttentionBackend,
};

/// The f32 view the kernels read per-row values through (a cast only if not f32 already).
fn f32_rows<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    t: Tensor<CubeBackend<R, F, I, BT>, 3>,
) -> CubeTensor<R> {
    f32_tensor(t)
}

impl<R: super::gemm::GemmRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedAttentionBackend for CubeBackend<R, F, I, BT> {
    fn attention_matmul(a: Tensor<Self, 4>, b: Tensor<Self, 4>) -> Tensor<Self, 4> {
        <Self as crate::linear::LinearBackend>::gemm_batched(a, b)
    }

    fn attention_kernel(q: &Tensor<Self, 4>, k: &Tensor<Self, 4>, v: &Tensor<Self, 4>, options: AttentionOptions) -> AttentionKernel {
        match super::flash::plan(q, k, v, options, Pass::Forward) {
            Some(_) if super::flash::chosen(options) == AttentionKernel::FlashForward => AttentionKernel::FlashForward,
            Some(_) => AttentionKernel::Flash,
            None => AttentionKernel::Blockwise,
        }
    }

    fn blockwise_attention_forward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        scale: f64,
        blocked: Tensor<Self, 4, Bool>,
        options: AttentionOptions,
    ) -> AttentionForward<Self> {
        match super::flash::plan(&q, &k, &v, options, Pass::Forward) {
            Some(plan) => super::flash::forward(q, k, v, scale, blocked, options, plan),
            None => blockwise_forward(q, k, v, scale, blocked, options),
        }
    }

    fn blockwise_attention_backward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        scale: f64,
        blocked: Tensor<Self, 4, Bool>,
        saved: AttentionForward<Self>,
        grad_output: Tensor<Self, 4>,
        options: AttentionOptions,
        wanted: AttentionWanted,
    ) -> AttentionGrads<Self> {
        match super::flash::plan(&q, &k, &v, options, Pass::Backward) {
            Some(plan) => super::flash::backward(q, k, v, scale, blocked, saved, grad_output, options, wanted, plan),
            None => blockwise_backward(q, k, v, scale, blocked, saved, grad_output, options, wanted),
        }
    }

    fn attention_block_softmax(
        scores: Tensor<Self, 4>,
        scale: f64,
        mask: Tensor<Self, 4, Bool>,
    ) -> (Tensor<Self, 4>, Tensor<Self, 3>) {
        let [b, h, rows, keys] = scores.dims();
        if b * h * rows * keys == 0 || !super::kernels_on(&cube_tensor(scores.clone()).client) {
            return block_softmax(scores, scale, mask);
        }
        let scores = into_contiguous(cube_tensor(scores));
        let mask = mask.into_primitive();
        let (client, device) = (scores.client.clone(), scores.device.clone());
        let probs = empty_device_contiguous_dtype(client.clone(), device.clone(), scores.shape(), scores.dtype);
        let lse = empty_device_contiguous_dtype(client.clone(), device, Shape::new([b, h, rows]), DType::F32);
        let units = row_units(keys, MAX_ROW_UNITS);
        let dtypes = [scores.dtype.into(), mask.dtype.into()];
        softmax_rows::launch::<R>(
            &client,
            row_cubes(b * h * rows),
            CubeDim::new_1d(units),
            scores.into_tensor_arg(),
            mask.into_tensor_arg(),
            probs.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            scale as f32,
            f32::INFINITY,
            units,
            dtypes,
        );
        (float(probs), float(lse))
    }

    fn attention_block_grad(
        scores: Tensor<Self, 4>,
        scale: f64,
        mask: Tensor<Self, 4, Bool>,
        lse: Tensor<Self, 3>,
        upstream: Option<(Tensor<Self, 4>, Tensor<Self, 3>)>,
        want_probs: bool,
    ) -> (Option<Tensor<Self, 4>>, Option<Tensor<Self, 4>>) {
        let [b, h, rows, keys] = scores.dims();
        if b * h * rows * keys == 0 || !(want_probs || upstream.is_some()) || !super::kernels_on(&cube_tensor(scores.clone()).client) {
            return block_softmax_grad(scores, scale, mask, lse, upstream, want_probs);
        }
        let write_grad = upstream.is_some();
        let scores = into_contiguous(cube_tensor(scores));
        let mask = mask.into_primitive();
        let lse = f32_rows(lse);
        let (client, device) = (scores.client.clone(), scores.device.clone());
        let output = |wanted: bool| {
            // An output the kernel does not write still takes an argument: one element.
            let shape = if wanted { scores.shape() } else { Shape::new([1]) };
            empty_device_contiguous_dtype(client.clone(), device.clone(), shape, scores.dtype)
        };
        let (probs, d_scores) = (output(want_probs), output(write_grad));
        // Without an upstream gradient the kernel reads neither dP nor delta: any tensors do.
        let (d_probs, delta) = match upstream {
            Some((d_probs, delta)) => {
                let d_probs = into_contiguous(cube_tensor(d_probs));
                assert_eq!(d_probs.shape(), scores.shape(), "attention block grad: dP and the scores differ in shape");
                (d_probs, f32_rows(delta))
            }
            None => (scores.clone(), lse.clone()),
        };
        let units = row_units(keys, MAX_ROW_UNITS);
        let dtypes = [scores.dtype.into(), mask.dtype.into()];
        softmax_grad_rows::launch::<R>(
            &client,
            row_cubes(b * h * rows),
            CubeDim::new_1d(units),
            scores.into_tensor_arg(),
            mask.into_tensor_arg(),
            lse.into_tensor_arg(),
            d_probs.into_tensor_arg(),
            delta.into_tensor_arg(),
            probs.clone().into_tensor_arg(),
            d_scores.clone().into_tensor_arg(),
            scale as f32,
            (b * h * rows) as u32,
            units,
            want_probs,
            write_grad,
            dtypes,
        );
        (want_probs.then(|| float(probs)), write_grad.then(|| float(d_scores)))
    }
}
