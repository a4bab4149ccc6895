//! What a backend can say about its device (the allocator's memory) and how host values reach
//! it (new tensors written from the host on all cores).

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray};
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{Shape, Tensor, TensorData};

/// The device allocator's view of memory, in bytes: what live tensors hold and what its pools
/// reserve from the driver. Pools grow to a step's peak and are kept, so `reserved` after a step
/// is the step's high-water mark (torch's `max_memory_reserved`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub in_use: u64,
    pub reserved: u64,
}

/// What writes a new tensor's values: `fill(offset, values)` sets `values` to the elements from
/// `offset` on, in row-major order. Called from several threads at once over ranges that do not
/// overlap, each element exactly once.
pub type Fill<'a, E> = dyn Fn(usize, &mut [E]) + Sync + 'a;

/// Backends with a device allocator to ask (by default none: the CPU's NdArray), and their way of
/// making a tensor from host values.
pub trait DeviceMemoryBackend: Backend {
    /// [`DeviceMemory`] of `device`, or `None` where the backend keeps no device pools.
    fn device_memory(device: &Self::Device) -> Option<DeviceMemory> {
        let _ = device;
        None
    }

    /// A tensor of `shape` in the backend's float type on `device`, its values written by `fill`
    /// (a model's weights: gigabytes). By default `fill` writes a host buffer on all cores that
    /// `Tensor::from_data` hands over; CUDA writes pinned staging buffers that are copied while
    /// the next is written.
    ///
    /// # Panics
    /// When `shape` does not have `D` dimensions.
    fn float_from_fill<const D: usize>(shape: Shape, device: &Self::Device, fill: &Fill<'_, Self::FloatElem>) -> Tensor<Self, D> {
        host_float_from_fill(shape, device, fill)
    }
}

/// [`DeviceMemoryBackend::float_from_fill`]'s default: a zeroed host buffer (fresh pages, first
/// touched by the threads that fill them) written on all cores, then `Tensor::from_data`.
pub fn host_float_from_fill<B: Backend, const D: usize>(shape: Shape, device: &B::Device, fill: &Fill<'_, B::FloatElem>) -> Tensor<B, D> {
    assert_eq!(shape.num_dims(), D, "a {D}-dimensional tensor from the shape {shape:?}");
    let mut values: Vec<B::FloatElem> = bytemuck::zeroed_vec(shape.num_elements());
    fill_on_all_cores(0, &mut values, fill);
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Values per piece that [`fill_on_all_cores`] hands one thread.
const PIECE: usize = 1 << 20;

/// `fill` over `values` (the elements from `offset` on), in pieces of [`PIECE`] on all cores.
pub(crate) fn fill_on_all_cores<E: Send>(offset: usize, values: &mut [E], fill: &Fill<'_, E>) {
    let pieces: Vec<(usize, &mut [E])> = values.chunks_mut(PIECE).enumerate().map(|(i, v)| (offset + i * PIECE, v)).collect();
    parallel_for(pieces, |(at, v)| fill(at, v));
}

/// `f` over `items` on all cores (scoped threads taking items in turn).
pub fn parallel_for<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len()).max(1);
    if threads == 1 {
        return items.into_iter().for_each(f);
    }
    let queue = std::sync::Mutex::new(items.into_iter());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let Some(item) = queue.lock().unwrap_or_else(|e| e.into_inner()).next() else { return };
                f(item);
            });
        }
    });
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> DeviceMemoryBackend for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
}

impl<B: DeviceMemoryBackend, C: CheckpointStrategy> DeviceMemoryBackend for Autodiff<B, C> {
    fn device_memory(device: &Self::Device) -> Option<DeviceMemory> {
        B::device_memory(device)
    }

    fn float_from_fill<const D: usize>(shape: Shape, device: &Self::Device, fill: &Fill<'_, Self::FloatElem>) -> Tensor<Self, D> {
        Tensor::from_inner(B::float_from_fill(shape, device, fill))
    }
}
