//! [`crate::optimizer`] on `CubeBackend`, where [`super::kernels_on`] says the kernels run: one
//! kernel per parameter for AdamW, and for the global gradient norm one launch per gradient
//! (each cube's sum of squares of a chunk into one buffer of partial sums) and one sum.

use burn::tensor::{DType, Shape, Tensor, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::CubeDim;

use super::layer_kernels::adamw_elements;
use super::norm_rows::square_sum_chunks;
use super::row_kernel::row_cubes;
use super::{cube_tensor, f32_tensor, float};
use crate::optimizer::{adamw_update_value, sum_of_squares_value, AdamWStep, AdamWUpdated, FusedOptimizerBackend};

/// Units per cube of the sum-of-squares chunks, and elements each unit reads.
const SUM_UNITS: u32 = 256;
const SUM_PER_UNIT: u32 = 16;

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

fn f32_contiguous<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(t: Tensor<Cube<R, F, I, BT>, 1>) -> CubeTensor<R> {
    into_contiguous(f32_tensor(t))
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedOptimizerBackend for CubeBackend<R, F, I, BT> {
    fn adamw_update(
        param: Tensor<Self, 1>,
        grad: Tensor<Self, 1>,
        grad_scale: Tensor<Self, 1>,
        exp_avg: Tensor<Self, 1>,
        exp_avg_sq: Tensor<Self, 1>,
        s: AdamWStep,
    ) -> AdamWUpdated<Self> {
        let [n] = param.dims();
        assert!(grad.dims() == [n] && exp_avg.dims() == [n] && exp_avg_sq.dims() == [n], "adamw_update: shapes differ");
        if n == 0 || !super::kernels_on(&param.clone().into_primitive().tensor().client) {
            return adamw_update_value(param, grad, grad_scale, exp_avg, exp_avg_sq, s);
        }
        let param = into_contiguous(param.into_primitive().tensor());
        let (grad, scale) = (f32_contiguous(grad), f32_contiguous(grad_scale));
        let (m, v) = (f32_contiguous(exp_avg), f32_contiguous(exp_avg_sq));
        let (client, device) = (param.client.clone(), param.device.clone());
        let param_out = empty_device_contiguous_dtype(client.clone(), device.clone(), param.shape(), param.dtype);
        let m_out = empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::new([n]), DType::F32);
        let v_out = empty_device_contiguous_dtype(client.clone(), device, Shape::new([n]), DType::F32);
        let dim = CubeDim::new(&client, n);
        let count = calculate_cube_count_elemwise(&client, n, dim);
        let dtype = param.dtype.into();
        adamw_elements::launch::<R>(
            &client,
            count,
            dim,
            param.into_tensor_arg(),
            grad.into_tensor_arg(),
            scale.into_tensor_arg(),
            m.into_tensor_arg(),
            v.into_tensor_arg(),
            param_out.clone().into_tensor_arg(),
            m_out.clone().into_tensor_arg(),
            v_out.clone().into_tensor_arg(),
            s.lr as f32,
            s.beta1 as f32,
            s.beta2 as f32,
            s.eps as f32,
            s.weight_decay as f32,
            (s.lr / s.bias_correction1) as f32,
            s.bias_correction2.sqrt() as f32,
            dtype,
        );
        AdamWUpdated { param: float(param_out), exp_avg: float(m_out), exp_avg_sq: float(v_out) }
    }

    fn sum_of_squares(grads: &[Tensor<Self, 1>]) -> Tensor<Self, 1> {
        assert!(!grads.is_empty(), "sum_of_squares of no tensors");
        let live: Vec<_> = grads.iter().filter(|g| g.dims()[0] > 0).cloned().collect();
        let Some(first) = live.first().map(|g| cube_tensor(g.clone())) else {
            return sum_of_squares_value(grads);
        };
        if !super::kernels_on(&first.client) {
            return sum_of_squares_value(grads);
        }
        let chunk = (SUM_UNITS * SUM_PER_UNIT) as usize;
        let chunks: Vec<usize> = live.iter().map(|g| g.dims()[0].div_ceil(chunk)).collect();
        let client = first.client.clone();
        let partials = empty_device_contiguous_dtype(client.clone(), first.device, Shape::new([chunks.iter().sum()]), DType::F32);
        let mut offset = 0;
        for (g, &c) in live.into_iter().zip(&chunks) {
            let g = into_contiguous(cube_tensor(g));
            let dtype = g.dtype.into();
            let (g, p) = (g.into_tensor_arg(), partials.clone().into_tensor_arg());
            square_sum_chunks::launch::<R>(&client, row_cubes(c), CubeDim::new_1d(SUM_UNITS), g, p, offset as u32, c as u32, SUM_UNITS, SUM_PER_UNIT, dtype);
            offset += c;
        }
        float::<R, F, I, BT, 1>(partials).sum()
    }
}
