//! The CubeCL launch patterns this crate's kernels are written in, each on its smallest kernel:
//! a checked `launch` reading elements, one reading a tensor's shape and strides, the same with
//! a generic float type bound by `#[define]`, the same as `launch_unchecked` with a dynamic
//! address type (burn-cubecl's own pattern), and a shared-memory tree reduction over a row.
//! On wgpu here (lavapipe without a GPU); on CUDA in the ignored test. Outputs are allocated with
//! `empty_device_contiguous_dtype`: on CUDA burn-cubecl's `empty_device_dtype` pads rows
//! (`[1, 3, 7]` f32 gets strides `[24, 8, 1]`), so a kernel that writes `out[i]` linearly into
//! such a tensor scrambles it; that was this crate's kernels' fault on CUDA (2026-12-02), found
//! here by `metadata_rank3`.

use burn::backend::wgpu::WgpuRuntime;
use burn::tensor::{Tensor, TensorData};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_contiguous_dtype, empty_device_dtype};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl::calculate_cube_count_elemwise;

const ROWS: usize = 37;
const COLS: usize = 101;

mod kernels {
    use cubecl::prelude::*;

    #[cube(launch)]
    pub fn copy_checked(x: &Tensor<f32>, out: &mut Tensor<f32>) {
        let i = ABSOLUTE_POS;
        if i < out.len() {
            out[i] = x[i];
        }
    }

    /// `out[i] = shape(0) * 1e6 + shape(1) * 1e3 + stride(0)`, then `+ x[i] * 0` (x is read).
    #[cube(launch)]
    pub fn metadata_checked(x: &Tensor<f32>, out: &mut Tensor<f32>) {
        let i = ABSOLUTE_POS;
        if i < out.len() {
            let code = x.shape(0) * 1000000 + x.shape(1) * 1000 + x.stride(0);
            out[i] = f32::cast_from(code) + x[i] * f32::new(0.0);
        }
    }

    #[cube(launch)]
    pub fn metadata_generic<E: Float>(x: &Tensor<E>, out: &mut Tensor<f32>, #[define(E)] _dtype: StorageType) {
        let i = ABSOLUTE_POS;
        if i < out.len() {
            let code = x.shape(0) * 1000000 + x.shape(1) * 1000 + x.stride(0);
            out[i] = f32::cast_from(code) + f32::cast_from(x[i]) * f32::new(0.0);
        }
    }

    #[cube(launch_unchecked, address_type = "dynamic")]
    pub fn metadata_unchecked(x: &Tensor<f32>, out: &mut Tensor<f32>) {
        let i = ABSOLUTE_POS;
        if i < out.len() {
            let code = x.shape(0) * 1000000 + x.shape(1) * 1000 + x.stride(0);
            out[i] = f32::cast_from(code) + x[i] * f32::new(0.0);
        }
    }

    /// Rank 3, two inputs read through their strides, as the SwiGLU kernel reads them.
    #[cube(launch)]
    pub fn sum_rank3<E: Float>(a: &Tensor<E>, b: &Tensor<E>, out: &mut Tensor<E>, #[define(E)] _dtype: StorageType) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let c = out.shape(2);
        let rows = out.shape(1);
        let i2 = i % c;
        let i1 = (i / c) % rows;
        let i0 = i / (c * rows);
        let x = a[i0 * a.stride(0) + i1 * a.stride(1) + i2 * a.stride(2)];
        let y = b[i0 * b.stride(0) + i1 * b.stride(1) + i2 * b.stride(2)];
        out[i] = x + y;
    }

    /// What the kernel reads as the rank, shape and strides of three rank-3 tensors, into
    /// `out[0..21]` (per tensor: rank, shape, strides).
    #[cube(launch)]
    pub fn metadata_rank3(a: &Tensor<f32>, b: &Tensor<f32>, out: &mut Tensor<f32>) {
        if ABSOLUTE_POS == 0 {
            out[0] = f32::cast_from(a.rank());
            out[7] = f32::cast_from(b.rank());
            out[14] = f32::cast_from(out.rank());
            for d in 0..3usize {
                out[1 + d] = f32::cast_from(a.shape(d));
                out[4 + d] = f32::cast_from(a.stride(d));
                out[8 + d] = f32::cast_from(b.shape(d));
                out[11 + d] = f32::cast_from(b.stride(d));
                out[15 + d] = f32::cast_from(out.shape(d));
                out[18 + d] = f32::cast_from(out.stride(d));
            }
        }
    }

    /// One cube of `units` per row of `x` (`[rows, cols]`): the row's sum into `out[row]`.
    #[cube(launch)]
    pub fn row_sums(x: &Tensor<f32>, out: &mut Tensor<f32>, #[comptime] units: u32) {
        let row = CUBE_POS_X as usize;
        let cols = x.shape(1);
        let unit = UNIT_POS_X as usize;
        let mut sum = f32::new(0.0);
        let mut j = unit;
        while j < cols {
            sum = sum + x[row * cols + j];
            j = j + units as usize;
        }
        let mut sums = SharedMemory::<f32>::new(units as usize);
        sums[unit] = sum;
        sync_cube();
        let mut half = (CUBE_DIM_X / 2) as usize;
        while half > 0 {
            if unit < half {
                sums[unit] = sums[unit] + sums[unit + half];
            }
            sync_cube();
            half = half / 2;
        }
        if unit == 0 {
            out[row] = sums[0];
        }
    }
}


mod wide_kernels {
    //! AdamW's launch shape (eight tensors, seven f32 scalars) and its halves. They pass on CUDA
    //! (2026-12-02): the `CUDA_ERROR_INVALID_VALUE` once blamed on the AdamW kernel was a launch
    //! over an empty tensor before it.
    use cubecl::prelude::*;

    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn scalars_seven(x: &Tensor<f32>, out: &mut Tensor<f32>, a: f32, b: f32, c: f32, d: f32, e: f32, f: f32, g: f32) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        out[i] = x[i] * a + b + c + d + e + f + g;
    }

    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn tensors_eight(
        x0: &Tensor<f32>,
        x1: &Tensor<f32>,
        x2: &Tensor<f32>,
        x3: &Tensor<f32>,
        x4: &Tensor<f32>,
        o0: &mut Tensor<f32>,
        o1: &mut Tensor<f32>,
        o2: &mut Tensor<f32>,
    ) {
        let i = ABSOLUTE_POS;
        if i >= o0.len() {
            terminate!();
        }
        let s = x0[i] + x1[i] + x2[i] + x3[i] + x4[0];
        o0[i] = s;
        o1[i] = s * f32::new(2.0);
        o2[i] = s * f32::new(3.0);
    }

    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn tensors_eight_scalars_seven(
        x0: &Tensor<f32>,
        x1: &Tensor<f32>,
        x2: &Tensor<f32>,
        x3: &Tensor<f32>,
        x4: &Tensor<f32>,
        o0: &mut Tensor<f32>,
        o1: &mut Tensor<f32>,
        o2: &mut Tensor<f32>,
        a: f32,
        b: f32,
        c: f32,
        d: f32,
        e: f32,
        f: f32,
        g: f32,
    ) {
        let i = ABSOLUTE_POS;
        if i >= o0.len() {
            terminate!();
        }
        let s = (x0[i] + x1[i] + x2[i] + x3[i] + x4[0]) * a + b + c + d + e + f + g;
        o0[i] = s;
        o1[i] = s * f32::new(2.0);
        o2[i] = s * f32::new(3.0);
    }
}

fn cube<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(t: Tensor<burn_cubecl::CubeBackend<R, F, I, BT>, 2>) -> CubeTensor<R> {
    into_contiguous(t.into_primitive().tensor())
}

fn read<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(t: CubeTensor<R>) -> Vec<f32> {
    let t: Tensor<burn_cubecl::CubeBackend<R, F, I, BT>, 1> = Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(t));
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// Runs every pattern on `B` (a `CubeBackend`), asserting each one's output.
fn patterns_hold<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(device: &R::Device) {
    type B<R, F, I, BT> = burn_cubecl::CubeBackend<R, F, I, BT>;
    let values: Vec<f32> = (0..ROWS * COLS).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0).collect();
    let x: Tensor<B<R, F, I, BT>, 2> = Tensor::from_data(TensorData::new(values.clone(), [ROWS, COLS]), device);
    let x = cube(x);
    let client = x.client.clone();
    let n = ROWS * COLS;
    let out = || empty_device_contiguous_dtype(client.clone(), x.device.clone(), [n].into(), burn::tensor::DType::F32);
    let dim = CubeDim::new(&client, n);
    let count = calculate_cube_count_elemwise(&client, n, dim);
    let code = (ROWS * 1_000_000 + COLS * 1000 + COLS) as f32;
    let mut failures = Vec::new();
    let mut check = |name: &str, got: Vec<f32>, want: &dyn Fn(usize) -> f32| {
        let bad: Vec<(usize, f32, f32)> =
            got.iter().enumerate().filter(|(i, g)| (**g - want(*i)).abs() > 1e-3 * want(*i).abs().max(1.0)).map(|(i, g)| (i, *g, want(i))).collect();
        let first = if bad.is_empty() { String::new() } else { format!(", first (index, got, want): {:?}", &bad[..bad.len().min(3)]) };
        println!("{name}: {} of {} wrong{first}", bad.len(), got.len());
        if !bad.is_empty() {
            failures.push(name.to_string());
        }
    };

    let o = out();
    kernels::copy_checked::launch::<R>(&client, count.clone(), dim, x.clone().into_tensor_arg(), o.clone().into_tensor_arg());
    check("copy_checked", read::<R, F, I, BT>(o), &|i| values[i]);

    let o = out();
    kernels::metadata_checked::launch::<R>(&client, count.clone(), dim, x.clone().into_tensor_arg(), o.clone().into_tensor_arg());
    check("metadata_checked", read::<R, F, I, BT>(o), &|_| code);

    let o = out();
    let dtype = x.dtype.into();
    kernels::metadata_generic::launch::<R>(&client, count.clone(), dim, x.clone().into_tensor_arg(), o.clone().into_tensor_arg(), dtype);
    check("metadata_generic", read::<R, F, I, BT>(o), &|_| code);

    let o = out();
    unsafe {
        kernels::metadata_unchecked::launch_unchecked::<R>(&client, count.clone(), dim, AddressType::U32, x.clone().into_tensor_arg(), o.clone().into_tensor_arg());
    }
    check("metadata_unchecked", read::<R, F, I, BT>(o), &|_| code);

    // Rank 3 (`[1, rows, cols]`), two inputs and the output each read through their strides.
    let x3 = cube(Tensor::<B<R, F, I, BT>, 2>::from_data(TensorData::new(values.clone(), [ROWS, COLS]), device));
    let a = burn_cubecl::ops::reshape(x3.clone(), [1, ROWS, COLS].into());
    let b = burn_cubecl::ops::reshape(x3, [1, ROWS, COLS].into());
    for cube_dim in [CubeDim::new(&client, n), CubeDim::new_1d(128)] {
        let o = empty_device_contiguous_dtype(client.clone(), x.device.clone(), [1, ROWS, COLS].into(), burn::tensor::DType::F32);
        let count = calculate_cube_count_elemwise(&client, n, cube_dim);
        let dtype = a.dtype.into();
        kernels::sum_rank3::launch::<R>(&client, count, cube_dim, a.clone().into_tensor_arg(), b.clone().into_tensor_arg(), o.clone().into_tensor_arg(), dtype);
        check(&format!("sum_rank3 cube {cube_dim:?}"), read::<R, F, I, BT>(burn_cubecl::ops::reshape(o, [n].into())), &|i| 2.0 * values[i]);
    }

    // The metadata itself, of distinct tensors with distinct shapes.
    let t = |shape: [usize; 3]| {
        let n: usize = shape.iter().product();
        cube(Tensor::<B<R, F, I, BT>, 2>::from_data(TensorData::new(vec![0f32; n], [1, n]), device))
    };
    let a = burn_cubecl::ops::reshape(t([2, 3, 5]), [2, 3, 5].into());
    // [7, 13, 11] with its last two dims swapped: shape [7, 11, 13], strides [143, 1, 11] (or
    // padded rows' strides: the kernel must read what the host holds).
    let b = Tensor::<B<R, F, I, BT>, 3>::from_data(TensorData::new(vec![0f32; 1001], [7, 13, 11]), device).swap_dims(1, 2);
    let b = b.into_primitive().tensor();
    let padded = empty_device_dtype(client.clone(), x.device.clone(), [1, 3, 7].into(), burn::tensor::DType::F32);
    println!("empty_device_dtype([1, 3, 7]) strides on this runtime: {:?}", padded.meta.strides());
    let o = empty_device_contiguous_dtype(client.clone(), x.device.clone(), [1, 3, 7].into(), burn::tensor::DType::F32);
    let meta = |t: &CubeTensor<R>| {
        let mut m = vec![t.meta.shape().len() as f32];
        m.extend(t.meta.shape().iter().map(|&d| d as f32));
        m.extend(t.meta.strides().iter().map(|&d| d as f32));
        m
    };
    let want: Vec<f32> = [meta(&a), meta(&b), meta(&o)].concat();
    kernels::metadata_rank3::launch::<R>(&client, CubeCount::Static(1, 1, 1), CubeDim::new_1d(32), a.clone().into_tensor_arg(), b.clone().into_tensor_arg(), o.clone().into_tensor_arg());
    let got = read::<R, F, I, BT>(burn_cubecl::ops::reshape(o, [21].into()));
    check("metadata_rank3 (rank, shape, strides of a, b, out)", got, &|i| want[i]);

    let units = 64u32;
    let sums = empty_device_contiguous_dtype(client.clone(), x.device.clone(), [ROWS].into(), burn::tensor::DType::F32);
    kernels::row_sums::launch::<R>(&client, CubeCount::Static(ROWS as u32, 1, 1), CubeDim::new_1d(units), x.clone().into_tensor_arg(), sums.clone().into_tensor_arg(), units);
    let want: Vec<f32> = (0..ROWS).map(|r| values[r * COLS..(r + 1) * COLS].iter().sum()).collect();
    check("row_sums", read::<R, F, I, BT>(sums), &|r| want[r]);

    // Last, since a failed launch can leave the context unusable: seven scalars, eight tensors, both.
    let o = out();
    let k = [2.0f32, 0.5, 0.25, 0.125, 1.0, 2.0, 4.0];
    let shift: f32 = k[1..].iter().sum();
    wide_kernels::scalars_seven::launch::<R>(&client, count.clone(), dim, x.clone().into_tensor_arg(), o.clone().into_tensor_arg(), k[0], k[1], k[2], k[3], k[4], k[5], k[6]);
    check("scalars_seven", read::<R, F, I, BT>(o), &|i| values[i] * k[0] + shift);
    let outs = || [out(), out(), out()];
    let arg = || x.clone().into_tensor_arg();
    let o = outs();
    let [a, b, c] = o.clone().map(|t| t.into_tensor_arg());
    wide_kernels::tensors_eight::launch::<R>(&client, count.clone(), dim, arg(), arg(), arg(), arg(), arg(), a, b, c);
    let [o0, o1, o2] = o;
    check("tensors_eight", read::<R, F, I, BT>(o2), &|i| 3.0 * (4.0 * values[i] + values[0]));
    drop((o0, o1));
    let o = outs();
    let [a, b, c] = o.clone().map(|t| t.into_tensor_arg());
    wide_kernels::tensors_eight_scalars_seven::launch::<R>(
        &client, count, dim, arg(), arg(), arg(), arg(), arg(), a, b, c, k[0], k[1], k[2], k[3], k[4], k[5], k[6],
    );
    let [o0, _, _] = o;
    check("tensors_eight_scalars_seven", read::<R, F, I, BT>(o0), &|i| (4.0 * values[i] + values[0]) * k[0] + shift);

    assert!(failures.is_empty(), "launch patterns wrong on this runtime: {failures:?}");
}

#[test]
fn wgpu_launch_patterns_hold() {
    patterns_hold::<WgpuRuntime, f32, i32, u32>(&burn::backend::wgpu::WgpuDevice::default());
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn cuda_launch_patterns_hold() {
    patterns_hold::<cubecl::cuda::CudaRuntime, f32, i32, u8>(&Default::default());
}
