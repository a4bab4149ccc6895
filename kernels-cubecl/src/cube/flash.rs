//! When the flash kernels ([`super::flash_kernel`]) run, with which tiles, and their launches
//! on `CubeBackend` tensors.

use burn::tensor::{Bool, DType, FloatDType, Shape, Tensor};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::features::MmaConfig;
use cubecl::ir::StorageType;
use cubecl::prelude::{ComputeClient, CubeCount, CubeDim};

use super::flash_kernel::{flash_backward_kv, flash_backward_q, flash_forward, mask_rows};
use super::flash_copy::{copies_async, BARRIERS};
use super::flash_mma::{flash_backward_kv_mma, flash_backward_q_mma, flash_forward_mma, KEYS, PAD, ROWS, UNITS};
use super::{cube_tensor, float};
use crate::attention::{AttentionForward, AttentionGrads, AttentionKernel, AttentionOptions, AttentionWanted, Dims};

/// Tiles of one kernel: `br` query rows by `bc` keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tiles {
    br: usize,
    bc: usize,
}

/// Which pass a plan is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pass {
    Forward,
    Backward,
}

/// How the flash kernels run for one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FlashPlan {
    tensor_cores: bool,
    /// The forward with its accumulators in registers ([`flash_forward_mma`]): CUDA's manual
    /// m16n8k16 products.
    forward_mma: bool,
    /// The queries' gradient likewise ([`flash_backward_q_mma`]).
    backward_q_mma: bool,
    /// The keys' and values' gradients likewise ([`flash_backward_kv_mma`]).
    backward_kv_mma: bool,
    units: usize,
    forward: Tiles,
    /// The keys' and values' gradients: `bc` keys a cube, `br` query rows a step.
    backward_kv: Tiles,
    backward_q: Tiles,
}

impl FlashPlan {
    /// Four planes of 32 on tensor cores; the tiles keep two cubes on an SM of 228 KiB at head
    /// dim 128 (~112 KiB each with the padded rows).
    const TENSOR_CORES: Self = Self {
        tensor_cores: true,
        forward_mma: false,
        backward_q_mma: false,
        backward_kv_mma: false,
        units: 128,
        forward: Tiles { br: 64, bc: 64 },
        backward_kv: Tiles { br: 64, bc: 32 },
        backward_q: Tiles { br: 64, bc: 32 },
    };
    /// One unit per product element: small tiles, within wgpu's 16 KiB of shared memory for
    /// small head dims (tests).
    const UNITS: Self = Self {
        tensor_cores: false,
        forward_mma: false,
        backward_q_mma: false,
        backward_kv_mma: false,
        units: 64,
        forward: Tiles { br: 16, bc: 16 },
        backward_kv: Tiles { br: 16, bc: 16 },
        backward_q: Tiles { br: 16, bc: 16 },
    };

    /// Shared memory of the largest of the three kernels at head dim `d`, `es` bytes an input
    /// element.
    fn shared_bytes(&self, d: usize, es: usize) -> usize {
        // Rows padded as the kernels pad them: +8 input elements, +4 f32.
        let (de, df) = (d + 8, d + 4);
        let Tiles { br, bc } = self.forward;
        let forward = es * ((br + 2 * bc) * de + br * (bc + 8)) + 4 * (br * (bc + 4) + br * df + 2 * br + 2 * self.units);
        let Tiles { br, bc } = self.backward_kv;
        let kv = es * ((2 * bc + 2 * br) * de + 2 * br * (bc + 8)) + 4 * (2 * br * (bc + 4) + 2 * bc * df + 2 * br);
        let Tiles { br, bc } = self.backward_q;
        let q = es * ((2 * br + 2 * bc) * de + br * (bc + 8) + 1) + 4 * (2 * br * (bc + 4) + br * df + 2 * br);
        forward.max(kv).max(q)
    }
}

/// The kernel the environment asks for in place of [`AttentionKernel::Auto`].
fn from_env() -> AttentionKernel {
    static KERNEL: std::sync::OnceLock<AttentionKernel> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| match std::env::var("KERNELS_CUBECL_ATTENTION").as_deref() {
        Ok("blockwise") => AttentionKernel::Blockwise,
        Ok("flash") => AttentionKernel::Flash,
        Ok("flash-forward") => AttentionKernel::FlashForward,
        _ => AttentionKernel::Auto,
    })
}

/// Whether `client` multiplies 16x16x16 fragments of `dtype` into f32 in planes of 32.
fn tensor_cores<R: CubeRuntime>(client: &ComputeClient<R>, dtype: DType) -> bool {
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return false;
    }
    let props = client.properties();
    let (ab, f32_type): (StorageType, StorageType) = (dtype.into(), DType::F32.into());
    let config = MmaConfig { a_type: ab, b_type: ab, cd_type: f32_type, m: 16, n: 16, k: 16 };
    props.hardware.plane_size_min == 32 && props.hardware.plane_size_max == 32 && props.features.matmul.cmma.contains(&config)
}

/// Whether `client` has CUDA's manual m16n8k16 products of `dtype` into f32 in planes of 32,
/// `ldmatrix` of `dtype` and asynchronous copies into shared memory (`cp.async`).
fn manual_mma<R: CubeRuntime>(client: &ComputeClient<R>, dtype: DType) -> bool {
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return false;
    }
    let props = client.properties();
    let (ab, f32_type): (StorageType, StorageType) = (dtype.into(), DType::F32.into());
    let config = MmaConfig { a_type: ab, b_type: ab, cd_type: f32_type, m: 16, n: 8, k: 16 };
    props.hardware.plane_size_min == 32
        && props.hardware.plane_size_max == 32
        && props.features.matmul.mma.contains(&config)
        && props.features.matmul.ldmatrix.contains(&ab)
        && props.features.copy_async
}

/// The kernel `options` ask for, the environment's in place of `Auto`.
pub(super) fn chosen(options: AttentionOptions) -> AttentionKernel {
    match options.kernel {
        AttentionKernel::Auto => from_env(),
        chosen => chosen,
    }
}

/// The plan for `pass` of the attention over `q` (`[batch, q_heads, seq, head_dim]`) and `k`,
/// `v` of the same dtype, or `None` for the blockwise path.
pub(super) fn plan<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    q: &Tensor<CubeBackend<R, F, I, BT>, 4>,
    k: &Tensor<CubeBackend<R, F, I, BT>, 4>,
    v: &Tensor<CubeBackend<R, F, I, BT>, 4>,
    options: AttentionOptions,
    pass: Pass,
) -> Option<FlashPlan> {
    let [b, hq, s, d] = q.dims();
    let dtype = q.dtype();
    if b * hq * s * d == 0 || k.dtype() != dtype || v.dtype() != dtype || !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return None;
    }
    let kernel = chosen(options);
    match (kernel, pass) {
        (AttentionKernel::Flash | AttentionKernel::Auto, _) | (AttentionKernel::FlashForward, Pass::Forward) => {}
        _ => return None,
    }
    let client = cube_tensor(q.clone()).client;
    if !super::kernels_on(&client) {
        return None;
    }
    let mut plan = match d % 16 == 0 && d <= 128 && tensor_cores(&client, dtype) {
        true => FlashPlan::TENSOR_CORES,
        false => FlashPlan::UNITS,
    };
    let shared = client.properties().hardware.max_shared_memory_size;
    // The register kernels' shared tiles (rows padded by PAD; the tiles walked over in two
    // halves, one computed while the other is copied), and beside them the query kernels'
    // key-block range (8 u32) or the keys' kernel's per-row log-sum-exp, delta and readable-key
    // interval (20 bytes a row), and the halves' two barriers.
    let fits = |bytes: usize| bytes <= shared;
    let es = dtype.size();
    if plan.tensor_cores && manual_mma(&client, dtype) {
        match pass {
            Pass::Forward => plan.forward_mma = fits(es * (ROWS + 4 * KEYS) * (d + PAD) + 32 + BARRIERS),
            Pass::Backward => {
                plan.backward_q_mma = fits(es * (2 * ROWS + 4 * KEYS) * (d + PAD) + 32 + BARRIERS);
                plan.backward_kv_mma = fits(es * (4 * ROWS + 2 * KEYS) * (d + PAD) + 20 * ROWS + BARRIERS);
            }
        }
    }
    // Auto takes the flash kernels only where they keep their accumulators in registers (CUDA's
    // manual mma): there they measure faster at the step than the blockwise path (Qwen2.5-7B
    // 1.12x, Qwen3-30B-A3B at 8 layers 1.19x; benches/RESULTS.md, session 31); the cmma and
    // per-unit kernels do not.
    let registers = match pass {
        Pass::Forward => plan.forward_mma,
        Pass::Backward => plan.backward_q_mma && plan.backward_kv_mma,
    };
    if kernel == AttentionKernel::Auto && !registers {
        return None;
    }
    (plan.forward_mma || fits(plan.shared_bytes(d, es))).then_some(plan)
}

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// Each query row's readable keys as one interval where they are one (`[batch, seq, 3]` i32:
/// first, last, whether every key between is readable), from the mask `[batch, 1, seq, seq]`.
fn row_keys<R: CubeRuntime>(mask: &CubeTensor<R>, batch: usize, seq: usize) -> CubeTensor<R> {
    const UNITS: usize = 128;
    let keys = empty_device_contiguous_dtype(mask.client.clone(), mask.device.clone(), Shape::new([batch, seq, 3]), DType::I32);
    // SAFETY: the kernel reads the mask below `seq` and writes its own row of `keys`.
    unsafe {
        mask_rows::launch_unchecked::<R>(
            &mask.client,
            CubeCount::Static(seq as u32, batch as u32, 1),
            CubeDim::new_1d(UNITS as u32),
            mask.clone().into_tensor_arg(),
            keys.clone().into_tensor_arg(),
            UNITS,
            mask.dtype.into(),
        );
    }
    keys
}

/// Elements a load of the inputs (the same for all): the widest that divides the head dim and
/// every input's outer strides and offset, with a unit last stride; 1 otherwise.
fn load_width<R: CubeRuntime>(inputs: &[&CubeTensor<R>], d: usize) -> usize {
    let Some(first) = inputs.first() else { return 1 };
    let widest = first.client.io_optimized_vector_sizes(first.dtype.size()).max().unwrap_or(1).min(8);
    let fits = |n: usize, t: &CubeTensor<R>| {
        let strides = t.meta.strides();
        let offset = t.handle.offset_start.unwrap_or(0) as usize;
        d % n == 0 && strides[3] == 1 && strides[..3].iter().all(|s| s % n == 0) && offset % (n * t.dtype.size()) == 0
    };
    let mut n = widest.max(1);
    while n > 1 && !inputs.iter().all(|t| fits(n, t)) {
        n /= 2;
    }
    n
}

/// The flash forward: output and row log-sum-exp, as [`crate::attention::blockwise_forward`].
pub(super) fn forward<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    q: Tensor<Cube<R, F, I, BT>, 4>,
    k: Tensor<Cube<R, F, I, BT>, 4>,
    v: Tensor<Cube<R, F, I, BT>, 4>,
    scale: f64,
    blocked: Tensor<Cube<R, F, I, BT>, 4, Bool>,
    options: AttentionOptions,
    plan: FlashPlan,
) -> AttentionForward<Cube<R, F, I, BT>> {
    Dims::check(&q, &k, &v, &blocked);
    let [b, hq, s, d] = q.dims();
    let (q, k, v, mask) = (cube_tensor(q), cube_tensor(k), cube_tensor(v), blocked.into_primitive());
    let (client, device) = (q.client.clone(), q.device.clone());
    let keys = row_keys(&mask, b, s);
    let width = load_width(&[&q, &k, &v], d);
    let out = empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::new([b, hq, s, d]), q.dtype);
    let lse = empty_device_contiguous_dtype(client.clone(), device, Shape::new([b, hq, s]), DType::F32);
    let Tiles { br, bc } = plan.forward;
    let dtypes = [q.dtype.into(), mask.dtype.into()];
    if plan.forward_mma && copies_async(width) {
        // SAFETY: as below; the fragments' shared-memory reads stay inside the padded tiles.
        unsafe {
            flash_forward_mma::launch_unchecked::<R>(
                &client,
                CubeCount::Static(s.div_ceil(ROWS) as u32, (b * hq) as u32, 1),
                CubeDim::new_1d(UNITS as u32),
                width,
                q.into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                mask.into_tensor_arg(),
                keys.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                lse.clone().into_tensor_arg(),
                scale as f32,
                f32::INFINITY,
                d,
                options.causal,
                dtypes,
            );
        }
        return AttentionForward { output: float(out), lse: float(lse) };
    }
    // SAFETY: every global read and write of the kernels is guarded by the sequence length, and
    // shared-memory indices stay inside the tiles (the wgpu tests run the same indexing checked).
    unsafe {
        flash_forward::launch_unchecked::<R>(
            &client,
            CubeCount::Static(s.div_ceil(br) as u32, (b * hq) as u32, 1),
            CubeDim::new_1d(plan.units as u32),
            width,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            mask.into_tensor_arg(),
            keys.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            scale as f32,
            f32::INFINITY,
            d,
            br,
            bc,
            plan.units,
            options.causal,
            plan.tensor_cores,
            dtypes,
        );
    }
    AttentionForward { output: float(out), lse: float(lse) }
}

/// The flash backward: the wanted gradients, as [`crate::attention::blockwise_backward`].
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    q: Tensor<Cube<R, F, I, BT>, 4>,
    k: Tensor<Cube<R, F, I, BT>, 4>,
    v: Tensor<Cube<R, F, I, BT>, 4>,
    scale: f64,
    blocked: Tensor<Cube<R, F, I, BT>, 4, Bool>,
    saved: AttentionForward<Cube<R, F, I, BT>>,
    grad_output: Tensor<Cube<R, F, I, BT>, 4>,
    options: AttentionOptions,
    wanted: AttentionWanted,
    plan: FlashPlan,
) -> AttentionGrads<Cube<R, F, I, BT>> {
    Dims::check_backward(&q, &k, &v, &blocked, &saved.output, &grad_output);
    let [b, hq, s, d] = q.dims();
    let hkv = k.dims()[1];
    let dtype = q.dtype();
    let grad_output = if grad_output.dtype() == dtype { grad_output } else { grad_output.cast(dtype) };
    // rowsum(dO ∘ O) = rowsum(P ∘ dP): the softmax's correction, per query row.
    let delta = (grad_output.clone().cast(FloatDType::F32) * saved.output.cast(FloatDType::F32)).sum_dim(3).reshape([b, hq, s]);
    let lse = saved.lse.cast(FloatDType::F32);
    let (q, k, v, mask) = (cube_tensor(q), cube_tensor(k), cube_tensor(v), blocked.into_primitive());
    let (d_out, lse, delta) = (cube_tensor(grad_output), cube_tensor(lse), cube_tensor(delta));
    let (client, device) = (q.client.clone(), q.device.clone());
    let keys = row_keys(&mask, b, s);
    let width = load_width(&[&q, &k, &v, &d_out], d);
    let q_dtype = q.dtype;
    let empty = |shape: [usize; 4]| empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::new(shape), q_dtype);
    let dtypes = [q.dtype.into(), mask.dtype.into()];
    let cube_dim = CubeDim::new_1d(plan.units as u32);
    let (mut grad_k, mut grad_v) = (None, None);
    if wanted.k || wanted.v {
        let (dk, dv) = (empty([b, hkv, s, d]), empty([b, hkv, s, d]));
        let Tiles { br, bc } = plan.backward_kv;
        if plan.backward_kv_mma && copies_async(width) {
            // SAFETY: as the forward's.
            unsafe {
                flash_backward_kv_mma::launch_unchecked::<R>(
                    &client,
                    CubeCount::Static(s.div_ceil(KEYS) as u32, (b * hkv) as u32, 1),
                    CubeDim::new_1d(UNITS as u32),
                    width,
                    q.clone().into_tensor_arg(),
                    k.clone().into_tensor_arg(),
                    v.clone().into_tensor_arg(),
                    mask.clone().into_tensor_arg(),
                    keys.clone().into_tensor_arg(),
                    d_out.clone().into_tensor_arg(),
                    lse.clone().into_tensor_arg(),
                    delta.clone().into_tensor_arg(),
                    dk.clone().into_tensor_arg(),
                    dv.clone().into_tensor_arg(),
                    scale as f32,
                    d,
                    options.causal,
                    dtypes,
                );
            }
        } else {
            // SAFETY: as the forward's.
            unsafe {
                flash_backward_kv::launch_unchecked::<R>(
                    &client,
                    CubeCount::Static(s.div_ceil(bc) as u32, (b * hkv) as u32, 1),
                    cube_dim,
                    width,
                    q.clone().into_tensor_arg(),
                    k.clone().into_tensor_arg(),
                    v.clone().into_tensor_arg(),
                    mask.clone().into_tensor_arg(),
                    keys.clone().into_tensor_arg(),
                    d_out.clone().into_tensor_arg(),
                    lse.clone().into_tensor_arg(),
                    delta.clone().into_tensor_arg(),
                    dk.clone().into_tensor_arg(),
                    dv.clone().into_tensor_arg(),
                    scale as f32,
                    d,
                    br,
                    bc,
                    options.causal,
                    plan.tensor_cores,
                    dtypes,
                );
            }
        }
        (grad_k, grad_v) = (wanted.k.then(|| float(dk)), wanted.v.then(|| float(dv)));
    }
    let grad_q = wanted.q.then(|| {
        let dq = empty([b, hq, s, d]);
        if plan.backward_q_mma && copies_async(width) {
            // SAFETY: as the forward's.
            unsafe {
                flash_backward_q_mma::launch_unchecked::<R>(
                    &client,
                    CubeCount::Static(s.div_ceil(ROWS) as u32, (b * hq) as u32, 1),
                    CubeDim::new_1d(UNITS as u32),
                    width,
                    q.into_tensor_arg(),
                    k.into_tensor_arg(),
                    v.into_tensor_arg(),
                    mask.into_tensor_arg(),
                    keys.into_tensor_arg(),
                    d_out.into_tensor_arg(),
                    lse.into_tensor_arg(),
                    delta.into_tensor_arg(),
                    dq.clone().into_tensor_arg(),
                    scale as f32,
                    d,
                    options.causal,
                    dtypes,
                );
            }
            return float(dq);
        }
        let Tiles { br, bc } = plan.backward_q;
        // SAFETY: as the forward's.
        unsafe {
            flash_backward_q::launch_unchecked::<R>(
                &client,
                CubeCount::Static(s.div_ceil(br) as u32, (b * hq) as u32, 1),
                cube_dim,
                width,
                q.into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                mask.into_tensor_arg(),
                keys.into_tensor_arg(),
                d_out.into_tensor_arg(),
                lse.into_tensor_arg(),
                delta.into_tensor_arg(),
                dq.clone().into_tensor_arg(),
                scale as f32,
                d,
                br,
                bc,
                options.causal,
                plan.tensor_cores,
                dtypes,
            );
        }
        float(dq)
    });
    AttentionGrads { q: grad_q, k: grad_k, v: grad_v }
}
