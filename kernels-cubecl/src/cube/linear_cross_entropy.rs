//! CubeCL implementation of [`crate::fused_linear_cross_entropy`]: per token chunk, the logits
//! from a GEMM with an f32 output (the runtime's, [`super::gemm`]: cuBLAS on CUDA, else
//! burn-cubecl's matmul), one kernel that turns each row into its loss and its gradient in
//! place, and two more GEMMs into `dh` and (accumulated in f32, in place) `dw`.

use burn::tensor::{DType, FloatDType, Int, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::{CubeCount, CubeDim};

use super::gemm::GemmRuntime;
use super::row_kernel::{cross_entropy_rows, cross_entropy_units, cross_entropy_width};

use crate::linear_cross_entropy::{check_inputs, FusedCrossEntropyBackend, LinearCrossEntropyOptions, LinearCrossEntropyParts, WantedGrads};

/// One cube per row along x, and 65535 cubes per dimension is all WebGPU/Vulkan promise.
const MAX_CUBES_X: usize = 65_535;

fn float<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    tensor: CubeTensor<R>,
) -> Tensor<CubeBackend<R, F, I, BT>, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(tensor))
}

fn cube_tensor<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    tensor: Tensor<CubeBackend<R, F, I, BT>, D>,
) -> CubeTensor<R> {
    tensor.into_primitive().tensor()
}


impl<R: GemmRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedCrossEntropyBackend
    for CubeBackend<R, F, I, BT>
{
    fn linear_cross_entropy_parts(
        h: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        labels: Tensor<Self, 1, Int>,
        options: LinearCrossEntropyOptions,
        wanted: WantedGrads,
    ) -> LinearCrossEntropyParts<Self> {
        let (n, hidden, vocab, tokens) = check_inputs(&h, &w, &labels, options.ignore_index);
        let device = h.device();
        let (h_dtype, w_dtype) = (h.dtype(), w.dtype());
        if n == 0 {
            return LinearCrossEntropyParts {
                sum: Tensor::<Self, 1>::zeros([1], &device).cast(FloatDType::F32),
                tokens,
                grad_h: wanted.h.then(|| Tensor::<Self, 2>::zeros([0, hidden], &device).cast(h_dtype)),
                grad_w: wanted.w.then(|| Tensor::<Self, 2>::zeros([hidden, vocab], &device).cast(w_dtype)),
            };
        }
        // The matmuls take both operands in one dtype: w's.
        let h = if h_dtype == w_dtype { h } else { h.cast(w_dtype) };
        let w = cube_tensor(w);
        let labels = into_contiguous(labels.into_primitive());
        let client = w.client.clone();
        let losses = empty_device_contiguous_dtype(client.clone(), w.device.clone(), Shape::new([n]), DType::F32);
        let ignore_index = i32::try_from(options.ignore_index).expect("ignore index fits in i32");
        let max_units = client.properties().hardware.max_units_per_cube;
        // One cube per row along x, and 65535 cubes per dimension is all WebGPU/Vulkan promise.
        let chunk = options.chunk_tokens_for(n, hidden, vocab).min(MAX_CUBES_X);
        let gemm = |a, ta, b, tb, out, acc| R::gemm::<F, I, BT>(a, ta, b, tb, 1.0, out, acc);
        let mut grad_h_chunks = Vec::new();
        // Accumulated in f32 across chunks, in place where the GEMM can.
        let mut grad_w: Option<CubeTensor<R>> = None;
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let h_chunk = cube_tensor(h.clone().slice([start..start + rows, 0..hidden]));
            // A fresh [rows, vocab] output; the kernel reads it through its strides.
            let logits = gemm(h_chunk.clone(), false, w.clone(), false, DType::F32, None);
            let width = cross_entropy_width(vocab, logits.meta.strides());
            let units = cross_entropy_units(vocab / width, max_units);
            // As Liger: the gradient block enters the matmuls in the weights' dtype (f32
            // accumulation); the kernel writes it so. Forward only, it writes nothing: a
            // placeholder of one load stands in.
            let dlogits_shape = if wanted.any() { Shape::new([rows, vocab]) } else { Shape::new([width]) };
            let dlogits = empty_device_contiguous_dtype(client.clone(), w.device.clone(), dlogits_shape, w_dtype);
            cross_entropy_rows::launch::<R>(
                &client,
                CubeCount::Static(rows as u32, 1, 1),
                CubeDim::new_1d(units),
                width,
                logits.into_tensor_arg(),
                labels.clone().into_tensor_arg(),
                losses.clone().into_tensor_arg(),
                dlogits.clone().into_tensor_arg(),
                start as u32,
                ignore_index,
                units,
                wanted.any(),
                [DType::F32.into(), w_dtype.into(), labels.dtype.into()],
            );
            if !wanted.any() {
                continue;
            }
            if wanted.h {
                grad_h_chunks.push(float(gemm(dlogits.clone(), false, w.clone(), true, h_dtype, None)));
            }
            if wanted.w {
                grad_w = Some(gemm(h_chunk, true, dlogits, false, DType::F32, grad_w.take()));
            }
        }
        let sum = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(losses)).sum();
        let grad_h = wanted.h.then(|| Tensor::cat(grad_h_chunks, 0));
        let grad_w = wanted.w.then(|| float::<R, F, I, BT>(grad_w.expect("one chunk at least")).cast(w_dtype));
        LinearCrossEntropyParts { sum, tokens, grad_h, grad_w }
    }
}
