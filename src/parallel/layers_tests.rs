//! Tensor-parallel layers on 2 and 4 thread ranks over loopback TCP against one rank's full
//! layer: outputs, and the gradients of the input, the weight and bias shards and both LoRA
//! factors, with and without sequence parallelism, and a column -> row MLP as a decoder block
//! uses them. Tolerance: 1e-5 of the largest value (f32; the ranks sum their partial products in
//! another order than one rank's GEMM).
//!
//! Each thread rank runs one backward per run: after a backward, Burn's autodiff frees unused
//! graph entries by locking every graph of the process, so a rank that finished its backward
//! waits for another rank's backward to end while that rank waits for the first one's next
//! collective (a deadlock until the collective timeout). Ranks in processes of their own, as
//! jobs run them, share no graphs; training over several steps is tested so.

use std::sync::Arc;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Tensor, TensorData};

use super::comm::Communicator;
use super::comm_tests::on_ranks;
use super::layers::{reduce_sequence_parallel_grad, ColumnParallelLinear, LoraShard, RowParallelLinear};
use super::regions::{GroupComm, Region, RegionBackend};
use super::ProcessGroup;

type W = NdArray<f32>;
type Ad = Autodiff<W>;

const TOLERANCE: f32 = 1e-5;
const SEQ_DIM: usize = 1;
const SCALE: f64 = 4.0;

/// Irregular values from a seed, the same on every rank.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            ((s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * 0.5
        })
        .collect()
}

fn full<const D: usize>(seed: u64, shape: [usize; D]) -> Tensor<W, D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(values(seed, n), shape), &Default::default())
}

fn leaf<const D: usize>(t: Tensor<W, D>) -> Tensor<Ad, D> {
    Tensor::from_inner(t).require_grad()
}

fn host<const D: usize>(t: Tensor<W, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn assert_close(label: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let error = got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / scale;
    assert!(error < TOLERANCE, "{label}: relative error {error}");
}

/// A layer's full tensors: `w [in, out]`, `bias [out]`, `a [in, r]`, `b [r, out]`.
#[derive(Clone, Copy)]
struct Sizes {
    batch: usize,
    seq: usize,
    inp: usize,
    out: usize,
    rank: usize,
}

struct Full {
    x: Tensor<W, 3>,
    w: Tensor<W, 2>,
    bias: Tensor<W, 1>,
    a: Tensor<W, 2>,
    b: Tensor<W, 2>,
    /// The loss's weights on the output: `loss = sum(y * probe)`.
    probe: Tensor<W, 3>,
}

fn full_layer(s: Sizes, seed: u64) -> Full {
    Full {
        x: full(seed, [s.batch, s.seq, s.inp]),
        w: full(seed + 1, [s.inp, s.out]),
        bias: full(seed + 2, [s.out]),
        a: full(seed + 3, [s.inp, s.rank]),
        b: full(seed + 4, [s.rank, s.out]),
        probe: full(seed + 5, [s.batch, s.seq, s.out]),
    }
}

/// Outputs and gradients, as host values: y, dx, dw, dbias, da, db.
type Results = [Vec<f32>; 6];

/// One rank's full layer under autodiff: the reference.
fn reference(f: &Full) -> Results {
    let (x, w, bias, a, b) = (leaf(f.x.clone()), leaf(f.w.clone()), leaf(f.bias.clone()), leaf(f.a.clone()), leaf(f.b.clone()));
    let [bt, s, i] = x.dims();
    let x2 = x.clone().reshape([bt * s, i]);
    let y = x2.clone().matmul(w.clone()) + bias.clone().unsqueeze() + (x2.matmul(a.clone()) * SCALE).matmul(b.clone());
    let y = y.reshape([bt, s, f.w.dims()[1]]);
    let grads = (y.clone() * Tensor::from_inner(f.probe.clone())).sum().backward();
    let g = |t: &Tensor<Ad, 2>| host(t.grad(&grads).unwrap());
    [host(y.inner()), host(x.grad(&grads).unwrap()), g(&w), host(bias.grad(&grads).unwrap()), g(&a), g(&b)]
}

/// `t`'s block `rank` of `parts` along `dim`.
fn block<const D: usize>(t: Tensor<W, D>, dim: usize, tp: ProcessGroup) -> Tensor<W, D> {
    let r = tp.block(t.dims()[dim]);
    t.narrow(dim, r.start, r.len())
}

fn group_comm(comm: super::tcp::TcpCommunicator) -> GroupComm<W> {
    GroupComm::new(Arc::new(comm) as Arc<dyn Communicator<W>>)
}

/// Rank `tp`'s column-parallel layer: output y (its column block, or gathered), and the
/// gradients of its shards, with the replicated factor's gradient reduced under sequence
/// parallelism.
fn column_rank(f: &Full, tp: ProcessGroup, comm: &GroupComm<W>, sp: bool, gather: bool) -> Results {
    let lora = LoraShard { a: f.a.clone(), b: f.b.clone(), scale: SCALE };
    let layer = ColumnParallelLinear::<W>::shard(f.w.clone(), Some(f.bias.clone()), Some(lora), tp, gather);
    let l = layer.lora.clone().unwrap();
    let ad = ColumnParallelLinear::<Ad> {
        weight: leaf(layer.weight),
        bias: layer.bias.map(leaf),
        lora: Some(LoraShard { a: leaf(l.a), b: leaf(l.b), scale: SCALE }),
        gather_output: gather,
    };
    let x = leaf(if sp { block(f.x.clone(), SEQ_DIM, tp) } else { f.x.clone() });
    let y = ad.forward(x.clone(), comm, sp.then_some(SEQ_DIM)).unwrap();
    let probe = if gather { f.probe.clone() } else { block(f.probe.clone(), 2, tp) };
    // Sharded outputs: the ranks' losses sum to the full one. Gathered: every rank has it whole.
    let grads = (y.clone() * Tensor::from_inner(probe)).sum().backward();
    comm.check().unwrap();
    let lora = ad.lora.as_ref().unwrap();
    let da = lora.a.grad(&grads).unwrap();
    let da = if sp { reduce_sequence_parallel_grad(da, comm.communicator()).unwrap() } else { da };
    [
        host(y.inner()),
        host(x.grad(&grads).unwrap()),
        host(ad.weight.grad(&grads).unwrap()),
        host(ad.bias.as_ref().unwrap().grad(&grads).unwrap()),
        host(da),
        host(lora.b.grad(&grads).unwrap()),
    ]
}

/// Rank `tp`'s row-parallel layer (input split here or given as this rank's block).
fn row_rank(f: &Full, tp: ProcessGroup, comm: &GroupComm<W>, sp: bool, input_is_parallel: bool) -> Results {
    let lora = LoraShard { a: f.a.clone(), b: f.b.clone(), scale: SCALE };
    let layer = RowParallelLinear::<W>::shard(f.w.clone(), Some(f.bias.clone()), Some(lora), tp, input_is_parallel);
    let l = layer.lora.clone().unwrap();
    let ad = RowParallelLinear::<Ad> {
        weight: leaf(layer.weight),
        bias: layer.bias.map(leaf),
        lora: Some(LoraShard { a: leaf(l.a), b: leaf(l.b), scale: SCALE }),
        input_is_parallel,
    };
    let x = leaf(if input_is_parallel { block(f.x.clone(), 2, tp) } else { f.x.clone() });
    let y = ad.forward(x.clone(), comm, sp.then_some(SEQ_DIM)).unwrap();
    let probe = if sp { block(f.probe.clone(), SEQ_DIM, tp) } else { f.probe.clone() };
    let grads = (y.clone() * Tensor::from_inner(probe)).sum().backward();
    comm.check().unwrap();
    let lora = ad.lora.as_ref().unwrap();
    let db = lora.b.grad(&grads).unwrap();
    let db = if sp { reduce_sequence_parallel_grad(db, comm.communicator()).unwrap() } else { db };
    // The bias is added once after the reduction: under sequence parallelism each rank's rows.
    let dbias = ad.bias.as_ref().unwrap().grad(&grads).unwrap();
    let dbias = if sp { reduce_sequence_parallel_grad(dbias, comm.communicator()).unwrap() } else { dbias };
    [host(y.inner()), host(x.grad(&grads).unwrap()), host(ad.weight.grad(&grads).unwrap()), host(dbias), host(lora.a.grad(&grads).unwrap()), host(db)]
}

/// The ranks' blocks of `whole` along `dim` of `shape`, end to end in rank order, as the ranks'
/// results are concatenated.
fn blocks_of(whole: &[f32], shape: &[usize], dim: usize, parts: usize) -> Vec<Vec<f32>> {
    let t = Tensor::<W, 1>::from_data(TensorData::new(whole.to_vec(), [whole.len()]), &Default::default());
    let dims: Vec<usize> = shape.to_vec();
    (0..parts)
        .map(|r| {
            let tp = ProcessGroup::new(r, parts);
            match dims.len() {
                1 => host(block(t.clone(), 0, tp)),
                2 => host(block(t.clone().reshape([dims[0], dims[1]]), dim, tp)),
                _ => host(block(t.clone().reshape([dims[0], dims[1], dims[2]]), dim, tp)),
            }
        })
        .collect()
}

const SIZES: Sizes = Sizes { batch: 2, seq: 8, inp: 12, out: 20, rank: 3 };

#[test]
fn column_parallel_equals_one_rank() {
    let s = SIZES;
    for (world, sp, gather) in [(2, false, false), (2, false, true), (2, true, false), (4, true, false), (4, false, true)] {
        let want = reference(&full_layer(s, 11));
        let got = on_ranks(world, move |comm| {
            let tp = ProcessGroup::new(comm.world_rank(), world);
            column_rank(&full_layer(s, 11), tp, &group_comm(comm), sp, gather)
        });
        let case = format!("column world={world} sp={sp} gather={gather}");
        for (r, g) in got.iter().enumerate() {
            let y_want = if gather { want[0].clone() } else { blocks_of(&want[0], &[s.batch, s.seq, s.out], 2, world)[r].clone() };
            assert_close(&format!("{case} rank {r} y"), &g[0], &y_want);
            let dx_want = if sp { blocks_of(&want[1], &[s.batch, s.seq, s.inp], SEQ_DIM, world)[r].clone() } else { want[1].clone() };
            assert_close(&format!("{case} rank {r} dx"), &g[1], &dx_want);
            assert_close(&format!("{case} rank {r} dw"), &g[2], &blocks_of(&want[2], &[s.inp, s.out], 1, world)[r]);
            assert_close(&format!("{case} rank {r} dbias"), &g[3], &blocks_of(&want[3], &[s.out], 0, world)[r]);
            assert_close(&format!("{case} rank {r} dA"), &g[4], &want[4]);
            assert_close(&format!("{case} rank {r} dB"), &g[5], &blocks_of(&want[5], &[s.rank, s.out], 1, world)[r]);
        }
    }
}

#[test]
fn row_parallel_equals_one_rank() {
    let s = SIZES;
    for (world, sp, parallel_input) in [(2, false, true), (2, false, false), (2, true, true), (4, true, true), (4, false, true)] {
        let want = reference(&full_layer(s, 23));
        let got = on_ranks(world, move |comm| {
            let tp = ProcessGroup::new(comm.world_rank(), world);
            row_rank(&full_layer(s, 23), tp, &group_comm(comm), sp, parallel_input)
        });
        let case = format!("row world={world} sp={sp} input_is_parallel={parallel_input}");
        for (r, g) in got.iter().enumerate() {
            let y_want = if sp { blocks_of(&want[0], &[s.batch, s.seq, s.out], SEQ_DIM, world)[r].clone() } else { want[0].clone() };
            assert_close(&format!("{case} rank {r} y"), &g[0], &y_want);
            let dx_want = if parallel_input { blocks_of(&want[1], &[s.batch, s.seq, s.inp], 2, world)[r].clone() } else { want[1].clone() };
            assert_close(&format!("{case} rank {r} dx"), &g[1], &dx_want);
            assert_close(&format!("{case} rank {r} dw"), &g[2], &blocks_of(&want[2], &[s.inp, s.out], 0, world)[r]);
            assert_close(&format!("{case} rank {r} dbias"), &g[3], &want[3]);
            assert_close(&format!("{case} rank {r} dA"), &g[4], &blocks_of(&want[4], &[s.inp, s.rank], 0, world)[r]);
            assert_close(&format!("{case} rank {r} dB"), &g[5], &want[5]);
        }
    }
}

/// `row(silu(column(x)))` as a decoder's MLP runs it, the sequence split outside the block
/// under sequence parallelism: the output and the input's gradient equal one rank's.
#[test]
fn column_then_row_equals_one_rank() {
    let (batch, seq, hidden, inter) = (2, 8, 12, 16);
    let reference = || {
        let x = leaf(full(31, [batch, seq, hidden]));
        let (w1, w2) = (Tensor::<Ad, 2>::from_inner(full(32, [hidden, inter])), Tensor::<Ad, 2>::from_inner(full(33, [inter, hidden])));
        let h = burn::tensor::activation::silu(x.clone().reshape([batch * seq, hidden]).matmul(w1));
        let y = h.matmul(w2).reshape([batch, seq, hidden]);
        let grads = (y.clone() * Tensor::from_inner(full(34, [batch, seq, hidden]))).sum().backward();
        (host(y.inner()), host(x.grad(&grads).unwrap()))
    };
    let (y_want, dx_want) = reference();
    for (world, sp) in [(2, false), (2, true), (4, true)] {
        let got = on_ranks(world, move |comm| {
            let tp = ProcessGroup::new(comm.world_rank(), world);
            let comm = group_comm(comm);
            let up = ColumnParallelLinear::<W>::shard(full(32, [hidden, inter]), None, None, tp, false);
            let down = RowParallelLinear::<W>::shard(full(33, [inter, hidden]), None, None, tp, true);
            let up = ColumnParallelLinear::<Ad> { weight: Tensor::from_inner(up.weight), bias: None, lora: None, gather_output: false };
            let down = RowParallelLinear::<Ad> { weight: Tensor::from_inner(down.weight), bias: None, lora: None, input_is_parallel: true };
            let split = |t: Tensor<W, 3>| if sp { block(t, SEQ_DIM, tp) } else { t };
            let x = leaf(split(full(31, [batch, seq, hidden])));
            let sp_dim = sp.then_some(SEQ_DIM);
            let h = burn::tensor::activation::silu(up.forward(x.clone(), &comm, sp_dim).unwrap());
            let y = down.forward(h, &comm, sp_dim).unwrap();
            let grads = (y.clone() * Tensor::from_inner(split(full(34, [batch, seq, hidden])))).sum().backward();
            comm.check().unwrap();
            (host(y.inner()), host(x.grad(&grads).unwrap()))
        });
        for (r, (y, dx)) in got.iter().enumerate() {
            let want = |v: &[f32]| if sp { blocks_of(v, &[batch, seq, hidden], SEQ_DIM, world)[r].clone() } else { v.to_vec() };
            assert_close(&format!("mlp world={world} sp={sp} rank {r} y"), y, &want(&y_want));
            assert_close(&format!("mlp world={world} sp={sp} rank {r} dx"), dx, &want(&dx_want));
        }
    }
}

/// Each region op's forward and backward against the collective written out on the host.
#[test]
fn region_ops_forward_and_backward() {
    let world = 2;
    let x = |r: u64| full(40 + r, [2, 4, 6]);
    let p = |r: u64, dims: [usize; 3]| full(50 + r, dims);
    let cat = |a: Tensor<W, 3>, b: Tensor<W, 3>| Tensor::cat(vec![a, b], 1);
    let regions = [
        Region::CopyToTensor,
        Region::ReduceFromTensor,
        Region::ScatterToSequence,
        Region::GatherFromSequence,
        Region::ReduceScatterToSequence,
        Region::GatherFromTensor,
        Region::GatherFromSequenceToReplicated,
        Region::ScatterToTensor,
    ];
    for region in regions {
        // One backward per thread rank per run (see the module).
        let got = on_ranks(world, move |comm| {
            let rank = comm.world_rank() as u64;
            let comm = group_comm(comm);
            let x = leaf(x(rank));
            let y = <Ad as RegionBackend>::region(x.clone(), region, 1, &comm).unwrap();
            let probe = Tensor::<Ad, 3>::from_inner(p(rank, y.dims()));
            let grads = (y.clone() * probe).sum().backward();
            comm.check().unwrap();
            (y.dims(), host(y.inner()), host(x.grad(&grads).unwrap()))
        });
        for (rank, (dims, y, dx)) in got.iter().enumerate() {
            let (tp, me, dims) = (ProcessGroup::new(rank, world), rank as u64, *dims);
            let (want_y, want_dx): (Tensor<W, 3>, Tensor<W, 3>) = match region {
                Region::CopyToTensor => (x(me), p(0, dims) + p(1, dims)),
                Region::ReduceFromTensor => (x(0) + x(1), p(me, dims)),
                Region::ScatterToSequence | Region::ScatterToTensor => (block(x(me), 1, tp), cat(p(0, dims), p(1, dims))),
                Region::GatherFromSequence => (cat(x(0), x(1)), block(p(0, dims) + p(1, dims), 1, tp)),
                Region::ReduceScatterToSequence => (block(x(0) + x(1), 1, tp), cat(p(0, dims), p(1, dims))),
                Region::GatherFromTensor | Region::GatherFromSequenceToReplicated => (cat(x(0), x(1)), block(p(me, dims), 1, tp)),
            };
            assert_close(&format!("{region:?} rank {rank} forward"), y, &host(want_y));
            assert_close(&format!("{region:?} rank {rank} backward"), dx, &host(want_dx));
        }
    }
}

/// The chunked vocab-parallel head and loss (gradients taken in the forward) on 2 and 4 ranks
/// against one rank's full logits and log-softmax: the loss, the hidden states' gradient (the
/// ranks' partial products summed by the copy-to region `h` enters through) and each rank's
/// block of the head's gradient; labels in every block, and ignored rows.
#[test]
fn chunked_vocab_parallel_linear_cross_entropy_equals_one_rank() {
    use burn::tensor::Int;
    let (rows, hidden, vocab) = (10, 12, 24);
    const LABELS: [i64; 10] = [0, 23, 5, -100, 12, 11, 18, 6, -100, 17];
    let labels_t = move || Tensor::<Ad, 1, Int>::from_data(TensorData::new(LABELS.to_vec(), [rows]), &Default::default());
    let reference = {
        let h = leaf(full(71, [rows, hidden]) * 3.0);
        let w = leaf(full(72, [hidden, vocab]));
        let logp = burn::tensor::activation::log_softmax(h.clone().matmul(w.clone()), 1);
        let picked = logp.gather(1, labels_t().clamp(0, vocab as i64 - 1).reshape([rows, 1])).reshape([rows]);
        let counted = labels_t().not_equal_elem(-100).float();
        let loss = -(picked * counted).sum();
        let grads = loss.backward();
        (host(loss.inner()), host(h.grad(&grads).unwrap()), host(w.grad(&grads).unwrap()))
    };
    for (world, chunk_rows) in [(2, None), (4, None), (2, Some(3))] {
        let got = on_ranks(world, move |comm| {
            let tp = ProcessGroup::new(comm.world_rank(), world);
            let comm = group_comm(comm);
            let w = leaf(block(full(72, [hidden, vocab]), 1, tp));
            let h = leaf(full(71, [rows, hidden]) * 3.0);
            let entered = <Ad as RegionBackend>::region(h.clone(), Region::CopyToTensor, 0, &comm).unwrap();
            let loss = super::vocab::vocab_parallel_linear_cross_entropy(entered, w.clone(), true, labels_t(), tp.block(vocab).start, -100, &comm, chunk_rows);
            let grads = loss.backward();
            comm.check().unwrap();
            (host(loss.inner()), host(h.grad(&grads).unwrap()), host(w.grad(&grads).unwrap()))
        });
        for (r, (loss, dh, dw)) in got.iter().enumerate() {
            assert_close(&format!("chunked vocab world={world} chunk {chunk_rows:?} rank {r} loss"), loss, &reference.0);
            assert_close(&format!("chunked vocab world={world} chunk {chunk_rows:?} rank {r} dh"), dh, &reference.1);
            assert_close(&format!("chunked vocab world={world} chunk {chunk_rows:?} rank {r} dw"), dw, &blocks_of(&reference.2, &[hidden, vocab], 1, world)[r]);
        }
    }
}
