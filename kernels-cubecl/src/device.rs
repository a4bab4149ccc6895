//! What a backend can say about its device: the allocator's memory.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray};
use burn::backend::NdArray;
use burn::tensor::backend::Backend;

/// The device allocator's view of memory, in bytes: what live tensors hold and what its pools
/// reserve from the driver. Pools grow to a step's peak and are kept, so `reserved` after a step
/// is the step's high-water mark (torch's `max_memory_reserved`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub in_use: u64,
    pub reserved: u64,
}

/// Backends with a device allocator to ask; by default none (the CPU's NdArray).
pub trait DeviceMemoryBackend: Backend {
    /// [`DeviceMemory`] of `device`, or `None` where the backend keeps no device pools.
    fn device_memory(device: &Self::Device) -> Option<DeviceMemory> {
        let _ = device;
        None
    }
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
}
