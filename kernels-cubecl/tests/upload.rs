//! New tensors written from the host (`DeviceMemoryBackend::float_from_fill`): every element
//! where `fill` put it, each written once, on NdArray, wgpu (Burn's `from_data` underneath) and,
//! in the ignored test, CUDA's pinned staging over several staging buffers.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::backend::wgpu::{CubeBackend, WgpuRuntime};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::{ElementConversion, Shape, Tensor};
use kernels_cubecl::DeviceMemoryBackend;

type Wgpu = CubeBackend<WgpuRuntime, f32, i32, u32>;

/// The value of element `i`: distinct across a piece's boundary, exact in bf16.
fn value(i: usize) -> f32 {
    ((i * 7) % 251) as f32 - 125.0
}

/// `B::float_from_fill` of `shape` with [`value`], and how many elements `fill` was asked for.
fn upload<B: DeviceMemoryBackend, const D: usize>(shape: [usize; D], device: &B::Device) -> (Tensor<B, D>, usize) {
    let asked = AtomicUsize::new(0);
    let fill = |offset: usize, dst: &mut [B::FloatElem]| {
        asked.fetch_add(dst.len(), Ordering::Relaxed);
        dst.iter_mut().enumerate().for_each(|(k, d)| *d = value(offset + k).elem());
    };
    let t = B::float_from_fill(Shape::new(shape), device, &fill);
    (t, asked.into_inner())
}

fn check<B: DeviceMemoryBackend, const D: usize>(shape: [usize; D], device: &B::Device) {
    let (t, asked) = upload::<B, D>(shape, device);
    let n: usize = shape.iter().product();
    assert_eq!(t.dims(), shape);
    assert_eq!(asked, n, "each element asked for once");
    let got = t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 values");
    let bad: Vec<usize> = (0..n).filter(|&i| got[i] != value(i)).take(5).collect();
    assert!(bad.is_empty(), "{shape:?}: elements {bad:?} are {:?}, want {:?}", bad.iter().map(|&i| got[i]).collect::<Vec<_>>(), bad.iter().map(|&i| value(i)).collect::<Vec<_>>());
}

#[test]
fn ndarray_and_autodiff_fill_every_element() {
    // Past one piece of 2^20 values: several threads write at once.
    check::<NdArray<f32>, 3>([3, 1000, 701], &Default::default());
    check::<Autodiff<NdArray<f32>>, 2>([5, 7], &Default::default());
    check::<NdArray<f32>, 2>([0, 7], &Default::default());
}

#[test]
fn wgpu_fill_every_element() {
    let device = Default::default();
    check::<Wgpu, 3>([3, 1000, 701], &device);
    check::<Autodiff<Wgpu>, 1>([13], &device);
    check::<Wgpu, 2>([0, 7], &device);
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn cuda_pinned_upload_fills_every_element() {
    type CudaBf16 = burn::backend::Cuda<burn::tensor::bf16, i32>;
    type CudaF32 = burn::backend::Cuda<f32, i32>;
    let device = Default::default();
    // 80 Mi bf16 values: three 64 MiB staging buffers' worth, the last one partly, so both
    // buffers are reused while the other's copy may be running.
    check::<CudaBf16, 3>([80, 1024, 1024], &device);
    check::<CudaF32, 2>([3, 5], &device);
    check::<CudaBf16, 2>([0, 5], &device);
}
