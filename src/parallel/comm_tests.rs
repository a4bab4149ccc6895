//! Ranks as threads of one test process, over loopback TCP: each collective against the same
//! maths done in one place, subgroups, and every way a job can fail.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};

use super::comm::{CommError, Communicator, ReduceOp, SingleRank};
use super::rendezvous::{self, RendezvousConfig};
use super::tcp::TcpCommunicator;

type B = NdArray<f32>;

fn config(port: u16, rank: usize, world: usize) -> RendezvousConfig {
    RendezvousConfig {
        master_addr: "127.0.0.1".into(),
        master_port: port,
        rank,
        world,
        fingerprint: "recipe-abc".into(),
        timeout: Duration::from_secs(20),
        collective_timeout: Duration::from_secs(20),
    }
}

/// Runs `f` on `world` ranks joined by a rendezvous on a free port; each rank's result, by rank.
pub(super) fn on_ranks<T: Send + 'static>(world: usize, f: impl Fn(TcpCommunicator) -> T + Send + Sync + 'static) -> Vec<T> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let f = Arc::new(f);
    let mut listener = Some(listener);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let f = f.clone();
            let listener = if rank == 0 { listener.take() } else { None };
            std::thread::spawn(move || {
                let cfg = config(port, rank, world);
                let comm = match listener {
                    Some(l) => rendezvous::serve(l, &cfg),
                    None => rendezvous::connect(&cfg),
                };
                f(comm.unwrap_or_else(|e| panic!("rank {rank}: {e}")))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Rank `r`'s test data: irregular values, so an order or block mix-up shows.
fn values(rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((rank * 31 + i * 7) % 13) as f32 * 0.37 - 1.9 + rank as f32 * 1e-3).collect()
}

fn tensor(v: Vec<f32>) -> Tensor<B, 1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), &Default::default())
}

fn host(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

#[test]
fn all_reduce_sums_in_rank_order_on_every_rank() {
    for world in [2, 3, 4] {
        let out = on_ranks(world, |c| {
            let x = tensor(values(c.world_rank(), 37));
            let sum = host(Communicator::<B>::all_reduce(&c, x.clone(), ReduceOp::Sum).unwrap());
            let max = host(Communicator::<B>::all_reduce(&c, x, ReduceOp::Max).unwrap());
            (sum, max)
        });
        let mut sum = values(0, 37);
        let mut max = values(0, 37);
        for r in 1..world {
            ReduceOp::Sum.apply(&mut sum, &values(r, 37));
            ReduceOp::Max.apply(&mut max, &values(r, 37));
        }
        for (s, m) in &out {
            // Bit for bit: the same order of additions as here, on every rank.
            assert_eq!(s.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), sum.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            assert_eq!(m, &max);
        }
    }
}

#[test]
fn all_gather_and_reduce_scatter_use_rank_order_blocks() {
    let world = 3;
    let out = on_ranks(world, move |c| {
        let r = c.world_rank();
        let gathered = host(Communicator::<B>::all_gather(&c, tensor(values(r, 5))).unwrap());
        let scattered = host(Communicator::<B>::reduce_scatter(&c, tensor(values(r, 4 * world)), ReduceOp::Sum).unwrap());
        (r, gathered, scattered)
    });
    let all: Vec<f32> = (0..world).flat_map(|r| values(r, 5)).collect();
    for (r, gathered, scattered) in out {
        assert_eq!(gathered, all);
        let mut block = values(0, 4 * world)[r * 4..(r + 1) * 4].to_vec();
        for q in 1..world {
            ReduceOp::Sum.apply(&mut block, &values(q, 4 * world)[r * 4..(r + 1) * 4]);
        }
        assert_eq!(scattered, block);
    }
}

#[test]
fn all_to_all_moves_uneven_blocks_and_counts() {
    let world = 4;
    // Rank r sends (r + j) % 3 elements to rank j: some blocks are empty.
    let count = |from: usize, to: usize| (from + to) % 3;
    let out = on_ranks(world, move |c| {
        let r = c.world_rank();
        let send: Vec<usize> = (0..world).map(|j| count(r, j)).collect();
        let recv = Communicator::<B>::all_to_all_counts(&c, &send).unwrap();
        let x: Vec<f32> = (0..world).flat_map(|j| (0..count(r, j)).map(move |i| (100 * r + 10 * j + i) as f32)).collect();
        let y = host(Communicator::<B>::all_to_all(&c, tensor(x), &send, &recv).unwrap());
        (r, recv, y)
    });
    for (r, recv, y) in out {
        assert_eq!(recv, (0..world).map(|j| count(j, r)).collect::<Vec<_>>());
        let expected: Vec<f32> = (0..world).flat_map(|j| (0..count(j, r)).map(move |i| (100 * j + 10 * r + i) as f32)).collect();
        assert_eq!(y, expected, "rank {r}");
    }
}

#[test]
fn broadcast_and_barrier() {
    let out = on_ranks(3, |c| {
        let r = c.world_rank();
        let y = host(Communicator::<B>::broadcast(&c, tensor(values(r, 6)), 2).unwrap());
        let id = c.broadcast_bytes(if r == 0 { b"nccl-unique-id" } else { b"" }, 0).unwrap();
        Communicator::<B>::barrier(&c).unwrap();
        (y, id)
    });
    for (y, id) in out {
        assert_eq!(y, values(2, 6));
        assert_eq!(id, b"nccl-unique-id");
    }
}

#[test]
fn subgroups_share_the_world_links() {
    // 4 ranks as tensor groups {0,1} {2,3} and data groups {0,2} {1,3}, used interleaved.
    let out = on_ranks(4, |c| {
        let r = c.world_rank();
        let tp = c.split("tensor", if r < 2 { &[0, 1] } else { &[2, 3] }).unwrap();
        let dp = c.split("data", if r % 2 == 0 { &[0, 2] } else { &[1, 3] }).unwrap();
        let a = tp.all_reduce_f32(&[r as f32], ReduceOp::Sum).unwrap();
        let b = dp.all_gather_f32(&[r as f32]).unwrap();
        let w = c.all_reduce_f32(&[1.0], ReduceOp::Sum).unwrap();
        (r, Communicator::<B>::group(&tp), a, b, w)
    });
    for (r, tp, a, b, w) in out {
        assert_eq!((tp.rank, tp.size), (r % 2, 2));
        assert_eq!(a, vec![if r < 2 { 1.0 } else { 5.0 }]);
        assert_eq!(b, if r % 2 == 0 { vec![0.0, 2.0] } else { vec![1.0, 3.0] });
        assert_eq!(w, vec![4.0]);
    }
}

#[test]
fn single_rank_returns_its_input() {
    let x = tensor(values(0, 4));
    assert_eq!(host(Communicator::<B>::all_gather(&SingleRank, x.clone()).unwrap()), values(0, 4));
    assert_eq!(Communicator::<B>::all_to_all_counts(&SingleRank, &[4]).unwrap(), vec![4]);
    assert!(matches!(Communicator::<B>::all_to_all(&SingleRank, x, &[3], &[3]), Err(CommError::Invalid(_))));
}

#[test]
fn a_rank_that_exits_ends_its_peers_collective_at_once() {
    let start = Instant::now();
    let out = on_ranks(3, |c| {
        let r = c.world_rank();
        c.barrier_host().unwrap();
        if r == 1 {
            drop(c);
            return None;
        }
        Some(c.all_reduce_f32(&[1.0], ReduceOp::Sum))
    });
    for res in out.into_iter().flatten() {
        assert_eq!(res, Err(CommError::PeerClosed { rank: 1 }));
    }
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
}

#[test]
fn a_silent_rank_times_out_with_its_name() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let quick = move |rank| RendezvousConfig { collective_timeout: Duration::from_millis(400), ..config(port, rank, 2) };
    let peer = std::thread::spawn(move || {
        let c = rendezvous::connect(&quick(1)).unwrap();
        std::thread::sleep(Duration::from_secs(2)); // alive, but never calls
        drop(c);
    });
    let c = rendezvous::serve(listener, &quick(0)).unwrap();
    let err = c.all_reduce_f32(&[1.0], ReduceOp::Sum).unwrap_err();
    assert!(matches!(err, CommError::Timeout { rank: 1, .. }), "{err}");
    assert!(err.to_string().contains("rank 1"), "{err}");
    peer.join().unwrap();
}

#[test]
fn ranks_out_of_step_fail_instead_of_mixing_buffers() {
    let out = on_ranks(2, |c| if c.world_rank() == 0 { c.all_reduce_f32(&[1.0, 2.0], ReduceOp::Sum).err() } else { c.barrier_host().err() });
    assert!(matches!(&out[0], Some(CommError::OutOfStep { rank: 1, .. })), "{:?}", out[0]);
    assert!(matches!(&out[1], Some(CommError::OutOfStep { rank: 0, .. })), "{:?}", out[1]);
    assert!(out[0].as_ref().unwrap().to_string().contains("different programs"));
}

#[test]
fn a_rank_with_another_recipe_is_refused_and_so_is_the_job() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let other = std::thread::spawn(move || rendezvous::connect(&RendezvousConfig { fingerprint: "recipe-xyz".into(), ..config(port, 1, 2) }).unwrap_err());
    let err = rendezvous::serve(listener, &config(port, 0, 2)).unwrap_err();
    assert!(err.to_string().contains("rank 1's recipe or trainer binary differs"), "{err}");
    let err = other.join().unwrap();
    assert!(matches!(err, CommError::Mismatch(_)) && err.to_string().contains("refused rank 1"), "{err}");
}

#[test]
fn a_world_size_that_differs_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let other = std::thread::spawn(move || rendezvous::connect(&config(port, 1, 3)).unwrap_err());
    let err = rendezvous::serve(listener, &config(port, 0, 2)).unwrap_err();
    assert!(err.to_string().contains("world of 3 ranks, rank 0 for 2"), "{err}");
    other.join().unwrap();
}

#[test]
fn launch_errors_name_the_address() {
    // A port in use.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = rendezvous::connect(&config(port, 0, 2)).unwrap_err();
    assert!(matches!(err, CommError::Bind { .. }) && err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
    // No master: a free port nobody serves.
    drop(taken);
    let err = rendezvous::connect(&RendezvousConfig { timeout: Duration::from_millis(300), ..config(port, 1, 2) }).unwrap_err();
    assert!(matches!(err, CommError::Unreachable { .. }) && err.to_string().contains("is rank 0 started"), "{err}");
    // A rank outside the world, and rank 0 alone waiting for ranks that never come.
    assert!(matches!(rendezvous::connect(&config(port, 2, 2)), Err(CommError::Mismatch(_))));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let err = rendezvous::serve(listener, &RendezvousConfig { timeout: Duration::from_millis(300), ..config(port, 0, 3) }).unwrap_err();
    assert!(err.to_string().contains("ranks 1, 2 to join"), "{err}");
    // Errors reach the user as the crate's error, exit code 2.
    assert_eq!(crate::Error::from(err).exit_code(), 2);
}
