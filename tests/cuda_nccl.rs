//! The NCCL communicator on one GPU, as a job of one rank forms it (the unique id over the
//! rendezvous, `ncclCommInitRank`): every collective of the `Communicator` trait on tensors a
//! kernel has just written and a kernel reads right after, so a collective queued out of order
//! with CubeCL's stream reads or leaves unfinished values and the check fails. Several ranks
//! need several GPUs (NCCL refuses two ranks on one): those runs are the multi-GPU issue's.
//! GPU-only: built with `--features cuda` and `#[ignore]`d; on the GPU machine, one process per
//! test (a process that made a bf16 CUDA tensor keeps making them):
//!
//!     cargo test --release --features cuda --test cuda_nccl -- --ignored --exact nccl_world_of_one_f32
#![cfg(feature = "cuda")]

use burn::backend::cuda::{Cuda, CudaDevice};
use burn::tensor::{FloatDType, Tensor, TensorData};
use trainer::parallel::comm::ReduceOp;
#[allow(unused_imports)]
use trainer::parallel::comm::Communicator;
use trainer::parallel::regions::RegionBackend;
use trainer::parallel::rendezvous::{self, RendezvousConfig};

fn world_of_one<B: RegionBackend<Wire = B, Device = CudaDevice>>(tolerance: f32) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = RendezvousConfig {
        master_addr: "127.0.0.1".into(),
        master_port: listener.local_addr().unwrap().port(),
        rank: 0,
        world: 1,
        fingerprint: "nccl".into(),
        timeout: std::time::Duration::from_secs(30),
        collective_timeout: std::time::Duration::from_secs(30),
    };
    let host = rendezvous::serve(listener, &cfg).unwrap();
    let device = CudaDevice::default();
    let group = B::group_communicator(host, &device).unwrap();
    let comm = group.communicator();
    assert_eq!((comm.group().rank, comm.group().size), (0, 1));
    // Large enough that a collective racing the kernel before it reads unwritten memory.
    let n = 1 << 22;
    let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 / 64.0 - 8.0).collect();
    let want: Vec<f32> = values.iter().map(|v| (v * 2.0 + 1.0) * 3.0).collect();
    let fresh = || Tensor::<B, 1>::from_data(TensorData::new(values.clone(), [n]), &device) * 2.0 + 1.0;
    let host_values = |t: Tensor<B, 1>| -> Vec<f32> { (t * 3.0).cast(FloatDType::F32).into_data().convert::<f32>().to_vec().unwrap() };
    let check = |what: &str, got: Vec<f32>| {
        assert_eq!(got.len(), want.len(), "{what}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got.iter().zip(&want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / scale;
        assert!(err <= tolerance, "{what}: max |diff| / max |want| = {err:e} (tolerance {tolerance:e})");
        eprintln!("{what}: ok ({err:.2e})");
    };
    for round in 0..3 {
        check(&format!("round {round}: all-reduce sum"), host_values(comm.all_reduce(fresh(), ReduceOp::Sum).unwrap()));
        check(&format!("round {round}: all-reduce max"), host_values(comm.all_reduce(fresh(), ReduceOp::Max).unwrap()));
        check(&format!("round {round}: all-gather"), host_values(comm.all_gather(fresh()).unwrap()));
        check(&format!("round {round}: reduce-scatter"), host_values(comm.reduce_scatter(fresh(), ReduceOp::Sum).unwrap()));
        check(&format!("round {round}: broadcast"), host_values(comm.broadcast(fresh(), 0).unwrap()));
        check(&format!("round {round}: all-to-all"), host_values(comm.all_to_all(fresh(), &[n], &[n]).unwrap()));
    }
    assert_eq!(comm.all_to_all_counts(&[5]).unwrap(), [5]);
    comm.barrier().unwrap();
    B::sync(&device).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU and libnccl"]
fn nccl_world_of_one_f32() {
    world_of_one::<Cuda<f32, i32>>(1e-6);
}

#[test]
#[ignore = "needs a CUDA GPU and libnccl"]
fn nccl_world_of_one_bf16() {
    // The inputs' bf16 rounding (8 bits of mantissa) and the product's.
    world_of_one::<Cuda<half::bf16, i32>>(1e-2);
}
