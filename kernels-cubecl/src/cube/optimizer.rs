//! [`crate::optimizer`] on `CubeBackend`: one kernel per parameter for AdamW, and the global
//! sum of squares as one kernel per gradient writing its cubes' partial sums into one buffer,
//! then one reduction of that buffer.

use burn::tensor::{DType, FloatDType, Shape, Tensor, TensorMetadata, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_dtype, zeros_client};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::{CubeCount, CubeDim};

use super::layer_kernels::{adamw_elements, sum_of_squares_parts};
use crate::optimizer::{AdamWStep, AdamWUpdated, FusedOptimizerBackend};

/// Units per cube of the sum of squares.
const UNITS: u32 = 256;
/// Elements each unit reads at least before another cube is worth launching.
const PER_UNIT: usize = 16;
/// Cubes per gradient at most.
const MAX_CUBES: usize = 1024;

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

fn f32_contiguous<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(t: Tensor<Cube<R, F, I, BT>, 1>) -> CubeTensor<R> {
    let t = if t.dtype() == DType::F32 { t } else { t.cast(FloatDType::F32) };
    into_contiguous(t.into_primitive().tensor())
}

fn float<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(t: CubeTensor<R>) -> Tensor<Cube<R, F, I, BT>, 1> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn cubes_for(n: usize) -> usize {
    n.div_ceil(UNITS as usize * PER_UNIT).clamp(1, MAX_CUBES)
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
        if n == 0 {
            return AdamWUpdated { param, exp_avg, exp_avg_sq };
        }
        let param = into_contiguous(param.into_primitive().tensor());
        let (grad, scale) = (f32_contiguous(grad), f32_contiguous(grad_scale));
        let (m, v) = (f32_contiguous(exp_avg), f32_contiguous(exp_avg_sq));
        let (client, device) = (param.client.clone(), param.device.clone());
        let param_out = empty_device_dtype(client.clone(), device.clone(), param.shape(), param.dtype);
        let m_out = empty_device_dtype(client.clone(), device.clone(), Shape::new([n]), DType::F32);
        let v_out = empty_device_dtype(client.clone(), device, Shape::new([n]), DType::F32);
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
        let total: usize = grads.iter().map(|g| cubes_for(g.dims()[0])).sum();
        let first = into_contiguous(grads[0].clone().into_primitive().tensor());
        let parts = zeros_client(first.client.clone(), first.device.clone(), Shape::new([total]), DType::F32);
        let mut offset = 0;
        for g in grads {
            let [n] = g.dims();
            let cubes = cubes_for(n);
            if n > 0 {
                let g = f32_contiguous(g.clone());
                sum_of_squares_parts::launch::<R>(
                    &g.client.clone(),
                    CubeCount::Static(cubes as u32, 1, 1),
                    CubeDim::new_1d(UNITS),
                    g.into_tensor_arg(),
                    parts.clone().into_tensor_arg(),
                    offset as u32,
                    UNITS,
                );
            }
            offset += cubes;
        }
        float::<R, F, I, BT>(parts).sum()
    }
}
