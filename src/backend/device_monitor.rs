//! The GPU's own counters, read through NVML (the library nvidia-smi reads; burn-train's
//! `sys-metrics` reads it through the same crate): the share of time a kernel was running and
//! the memory used on the whole device (every process's and the driver's, as nvidia-smi shows
//! it), sampled by a thread every [`PERIOD`]. Beside the allocator's view
//! ([`super::DeviceMemory`]) it tells a host-bound step (the GPU idle between kernels) from a
//! device-bound one: `gpu_busy` in `trainer run`'s metrics and in `trainer bench`'s report.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the counters are read. NVML's utilisation is itself an average over its own
/// sample period (1/6 s to 1 s by device), so reading faster adds nothing.
pub const PERIOD: Duration = Duration::from_millis(100);

/// One reading: when (Unix seconds), the share of the last sample period a kernel ran (0..=1),
/// and the device memory in use, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceSample {
    pub unix: f64,
    pub busy: f64,
    pub used: u64,
}

/// The readings of a time window: the mean busy share and the most memory used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceLoad {
    pub busy: f64,
    pub used_peak: u64,
    pub samples: usize,
}

/// The readings a source gives: busy share (0..=1) and bytes used; `None` when a read fails
/// (the sample is skipped).
pub type Reading = Option<(f64, u64)>;

/// A thread reading the counters until dropped.
pub struct DeviceMonitor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    samples: Mutex<Vec<DeviceSample>>,
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl DeviceMonitor {
    /// Start reading `read` every `period` (the first reading at once).
    pub fn start(mut read: impl FnMut() -> Reading + Send + 'static, period: Duration) -> DeviceMonitor {
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("device-monitor".into())
                .spawn(move || loop {
                    if let Some((busy, used)) = read() {
                        let sample = DeviceSample { unix: unix_now(), busy: busy.clamp(0.0, 1.0), used };
                        shared.samples.lock().unwrap_or_else(|e| e.into_inner()).push(sample);
                    }
                    // Sleep a period, or less when asked to stop.
                    let stopped = shared.stopped.lock().unwrap_or_else(|e| e.into_inner());
                    let (stopped, _) = shared.wake.wait_timeout_while(stopped, period, |s| !*s).unwrap_or_else(|e| e.into_inner());
                    if *stopped {
                        break;
                    }
                })
                .ok()
        };
        DeviceMonitor { shared, thread }
    }

    /// The readings taken from `from` to `to` (Unix seconds); `None` when there are none.
    pub fn load_between(&self, from: f64, to: f64) -> Option<DeviceLoad> {
        let samples = self.shared.samples.lock().unwrap_or_else(|e| e.into_inner());
        load_of(samples.iter().filter(|s| s.unix >= from && s.unix <= to))
    }

    /// The readings since the last call (or the start), dropped once read: a run's metrics take
    /// one window per logged step, so a long run keeps no history.
    pub fn take(&self) -> Option<DeviceLoad> {
        let mut samples = self.shared.samples.lock().unwrap_or_else(|e| e.into_inner());
        let load = load_of(samples.iter());
        samples.clear();
        load
    }
}

impl Drop for DeviceMonitor {
    fn drop(&mut self) {
        *self.shared.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn load_of<'a>(samples: impl Iterator<Item = &'a DeviceSample>) -> Option<DeviceLoad> {
    let (mut busy, mut used_peak, mut n) = (0.0, 0, 0);
    for s in samples {
        busy += s.busy;
        used_peak = used_peak.max(s.used);
        n += 1;
    }
    (n > 0).then(|| DeviceLoad { busy: busy / n as f64, used_peak, samples: n })
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The NVML monitor of CUDA device `ordinal` (as this process numbers it, after
/// `CUDA_VISIBLE_DEVICES`): found in NVML by its PCI address, since NVML numbers every device
/// of the machine. `None` where NVML cannot be loaded (no driver) or has no such device: the
/// metrics then go without these counters.
#[cfg(feature = "cuda")]
pub fn nvml(ordinal: usize) -> Option<DeviceMonitor> {
    use cudarc::driver::{result, sys::CUdevice_attribute as A};
    use nvml_wrapper::Nvml;
    result::init().ok()?;
    let dev = result::device::get(ordinal as i32).ok()?;
    // SAFETY: `dev` is a device cuDeviceGet returned.
    let attr = |a| unsafe { result::device::get_attribute(dev, a) }.ok();
    let (domain, bus, device) = (attr(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?, attr(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?, attr(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?);
    let bus_id = format!("{domain:08x}:{bus:02x}:{device:02x}.0");
    let nvml = Nvml::init().ok()?;
    // Fail here, not silently in the thread, when the device is not NVML's.
    nvml.device_by_pci_bus_id(bus_id.as_str()).ok()?;
    let read = move || {
        let device = nvml.device_by_pci_bus_id(bus_id.as_str()).ok()?;
        let busy = device.utilization_rates().ok()?.gpu as f64 / 100.0;
        Some((busy, device.memory_info().ok()?.used))
    };
    Some(DeviceMonitor::start(read, PERIOD))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn windows_average_the_busy_share_and_keep_the_peak_memory() {
        let reads = Arc::new(AtomicUsize::new(0));
        let counter = reads.clone();
        // Alternately idle and busy, memory growing by one byte a reading; every third read fails.
        let monitor = DeviceMonitor::start(
            move || {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                (n % 3 != 2).then_some(((n % 2) as f64, n as u64))
            },
            Duration::from_millis(2),
        );
        let t0 = unix_now();
        while reads.load(Ordering::SeqCst) < 30 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let all = monitor.load_between(t0 - 1.0, unix_now() + 1.0).unwrap();
        assert!(all.samples >= 20, "{all:?}");
        assert!(all.busy > 0.2 && all.busy < 0.8, "{all:?}");
        assert!(all.used_peak >= 28, "{all:?}");
        assert_eq!(monitor.load_between(t0 - 10.0, t0 - 5.0), None);
        let taken = monitor.take().unwrap();
        assert!(taken.samples >= all.samples);
        // What was taken is gone; later readings make the next window.
        let after = reads.load(Ordering::SeqCst);
        while reads.load(Ordering::SeqCst) < after + 4 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let next = monitor.take().unwrap();
        assert!(next.samples < taken.samples && next.used_peak > taken.used_peak, "{next:?} after {taken:?}");
        drop(monitor);
        // Dropping stops the thread: no reading after it.
        let stopped = reads.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(reads.load(Ordering::SeqCst), stopped);
    }

    #[test]
    fn a_source_that_never_reads_gives_no_load() {
        let monitor = DeviceMonitor::start(|| None, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(monitor.take(), None);
        assert_eq!(monitor.load_between(0.0, f64::MAX), None);
    }
}
