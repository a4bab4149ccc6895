//! [`crate::optimizer`] on `CubeBackend`, where [`super::kernels_on`] says the kernels run:
//! AdamW over lists of parameters and the global gradient norm over lists of gradients, each
//! list one launch of a multi-tensor kernel (`multi_tensor.rs`), as many tensors per launch as
//! the runtime's bindings and CUDA's parameter space allow ([`list_len`]).

use burn::tensor::{DType, Shape, Tensor, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::{ComputeClient, CubeDim, SequenceArg};

use super::multi_tensor::{adamw_tensors, square_sum_tensors};
use super::row_kernel::row_cubes;
use super::{cube_tensor, f32_tensor, float};
use crate::optimizer::{adamw_update_value, sum_of_squares_value, AdamWStep, AdamWTensors, AdamWUpdated, FusedOptimizerBackend};

/// Tensors per launch at most (the kernel unrolls its lookup once per tensor), and bindings per
/// launch at most: on CUDA each binding is a pointer among the kernel's parameters and the
/// tensors' lengths are in the metadata passed there too, all within CUDA's 4 KiB of parameter
/// space; 80 bindings keep well inside it.
const MAX_LIST: usize = 32;
const MAX_BINDINGS: usize = 80;
/// Units per cube, and elements each cube covers, of both kernels.
const UNITS: u32 = 256;
const PER_CUBE: usize = 4096;

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// Tensors per launch for a kernel with `per_tensor` bindings a tensor and a few of its own.
fn list_len<R: CubeRuntime>(client: &ComputeClient<R>, per_tensor: usize) -> usize {
    let bindings = (client.properties().hardware.max_bindings as usize).min(MAX_BINDINGS);
    (bindings.saturating_sub(4) / per_tensor).clamp(1, MAX_LIST)
}

fn f32_contiguous<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(t: Tensor<Cube<R, F, I, BT>, 1>) -> CubeTensor<R> {
    into_contiguous(f32_tensor(t))
}

/// `t` as memory this update may write: itself when nothing else holds it, else a copy.
fn writable<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    match (t.is_contiguous(), t.can_mut()) {
        (true, true) => t,
        (true, false) => t.copy(),
        (false, _) => into_contiguous(t),
    }
}

/// Cubes of a list of tensors of these lengths, laid end to end.
fn cubes(lengths: impl Iterator<Item = usize>) -> usize {
    lengths.map(|n| n.div_ceil(PER_CUBE)).sum()
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedOptimizerBackend for CubeBackend<R, F, I, BT> {
    fn adamw_update_many(tensors: Vec<AdamWTensors<Self>>, grad_scale: Tensor<Self, 1>, s: AdamWStep) -> Vec<AdamWUpdated<Self>> {
        let Some(first) = tensors.first() else {
            return Vec::new();
        };
        let client = cube_tensor(first.param.clone()).client;
        if !super::kernels_on(&client) {
            return tensors.into_iter().map(|t| adamw_update_value(t, grad_scale.clone(), s)).collect();
        }
        for t in &tensors {
            let [n] = t.param.dims();
            assert!(t.grad.dims() == [n] && t.exp_avg.dims() == [n] && t.exp_avg_sq.dims() == [n], "adamw_update_many: shapes differ");
        }
        let scale = f32_contiguous(grad_scale);
        let per_launch = list_len(&client, 5);
        let mut updated: Vec<Option<AdamWUpdated<Self>>> = (0..tensors.len()).map(|_| None).collect();
        // Lists of one parameter dtype (the kernel's `E`) in the callers' order; an empty tensor
        // has nothing to update (and CUDA refuses an empty binding).
        let mut lists: Vec<(DType, Vec<(usize, AdamWTensors<Self>)>)> = Vec::new();
        for (i, t) in tensors.into_iter().enumerate() {
            if t.param.dims()[0] == 0 {
                updated[i] = Some(AdamWUpdated { param: t.param, exp_avg: t.exp_avg, exp_avg_sq: t.exp_avg_sq });
                continue;
            }
            let dtype = t.param.dtype();
            match lists.iter_mut().rev().find(|(d, list)| *d == dtype && list.len() < per_launch) {
                Some((_, list)) => list.push((i, t)),
                None => lists.push((dtype, vec![(i, t)])),
            }
        }
        for (dtype, list) in lists {
            let count = cubes(list.iter().map(|(_, t)| t.param.dims()[0]));
            let (mut params, mut outs, mut grads, mut ms, mut vs) = (SequenceArg::new(), SequenceArg::new(), SequenceArg::new(), SequenceArg::new(), SequenceArg::new());
            let mut order = Vec::with_capacity(list.len());
            for (i, t) in list {
                let param = into_contiguous(cube_tensor(t.param));
                let out = empty_device_contiguous_dtype(client.clone(), param.device.clone(), param.shape(), param.dtype);
                let (m, v) = (writable(f32_contiguous(t.exp_avg)), writable(f32_contiguous(t.exp_avg_sq)));
                params.push(param.into_tensor_arg());
                outs.push(out.clone().into_tensor_arg());
                grads.push(f32_contiguous(t.grad).into_tensor_arg());
                ms.push(m.clone().into_tensor_arg());
                vs.push(v.clone().into_tensor_arg());
                order.push((i, out, m, v));
            }
            adamw_tensors::launch::<R>(
                &client,
                row_cubes(count),
                CubeDim::new_1d(UNITS),
                params,
                outs,
                grads,
                ms,
                vs,
                scale.clone().into_tensor_arg(),
                s.lr as f32,
                s.beta1 as f32,
                s.beta2 as f32,
                s.eps as f32,
                s.weight_decay as f32,
                (s.lr / s.bias_correction1) as f32,
                s.bias_correction2.sqrt() as f32,
                PER_CUBE,
                dtype.into(),
            );
            for (i, out, m, v) in order {
                updated[i] = Some(AdamWUpdated { param: float(out), exp_avg: float(m), exp_avg_sq: float(v) });
            }
        }
        updated.into_iter().map(|u| u.expect("every tensor is in one list")).collect()
    }

    fn sum_of_squares(grads: &[Tensor<Self, 1>]) -> Tensor<Self, 1> {
        assert!(!grads.is_empty(), "sum_of_squares of no tensors");
        let live: Vec<CubeTensor<R>> = grads.iter().filter(|g| g.dims()[0] > 0).map(|g| into_contiguous(cube_tensor(g.clone()))).collect();
        let Some(first) = live.first() else {
            return sum_of_squares_value(grads);
        };
        let (client, device) = (first.client.clone(), first.device.clone());
        if !super::kernels_on(&client) {
            return sum_of_squares_value(grads);
        }
        let per_launch = list_len(&client, 1);
        let mut lists: Vec<(DType, Vec<CubeTensor<R>>)> = Vec::new();
        for g in live {
            match lists.iter_mut().rev().find(|(d, list)| *d == g.dtype && list.len() < per_launch) {
                Some((_, list)) => list.push(g),
                None => lists.push((g.dtype, vec![g])),
            }
        }
        let total: usize = lists.iter().map(|(_, list)| cubes(list.iter().map(|g| g.shape().num_elements()))).sum();
        let partials = empty_device_contiguous_dtype(client.clone(), device, Shape::new([total]), DType::F32);
        let mut offset = 0;
        for (dtype, list) in lists {
            let count = cubes(list.iter().map(|g| g.shape().num_elements()));
            let seq: SequenceArg<R, _> = list.into_iter().map(|g| g.into_tensor_arg()).collect();
            square_sum_tensors::launch::<R>(&client, row_cubes(count), CubeDim::new_1d(UNITS), seq, partials.clone().into_tensor_arg(), offset as u32, UNITS, PER_CUBE, dtype.into());
            offset += count;
        }
        float::<R, F, I, BT, 1>(partials).sum()
    }
}
