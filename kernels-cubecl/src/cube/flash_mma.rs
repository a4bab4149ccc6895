//! FlashAttention-2's forward with its accumulators in registers (Dao, 2023, section 3.1): CUDA's
//! warp-level tensor-core product `mma.sync` m16n8k16 (bf16/f16 into f32) through CubeCL's
//! manual `MmaDefinition`, where [`super::flash_kernel::flash_forward`] keeps its scores and
//! output in shared memory (CubeCL's `cmma` fragments cannot be rescaled per row).
//!
//! A cube of four planes takes 64 query rows, 16 a plane, and walks the key blocks of 64: each
//! plane holds its rows' query fragments, scores, output and softmax statistics in registers;
//! the block's keys and values (values transposed, so that each lane's two consecutive keys are
//! one 32-bit pair) are the only shared tiles. A lane holds two rows of each fragment (`g` and
//! `g + 8`, `g = lane / 4`), so a row's max and sum are reduced over the four lanes of its quad.
//!
//! The fragments' layouts are PTX's for m16n8k16 (the ones CubeCL's CUDA target gives
//! `MmaDefinition::position_of_nth`), with `g = lane / 4`, `t = lane % 4`, each register two
//! consecutive elements:
//! - A (16x16, row-major): register `i` holds row `g + 8 (i % 2)`, columns `2t + 8 (i / 2) + {0, 1}`;
//! - B (16x8): register `i` holds rows (k) `2t + 8 i + {0, 1}` of column (n) `g`;
//! - C (16x8, f32): register `i` holds row `g + 8 i`, columns `2t + {0, 1}`.
//!
//! So the scores of keys `16 jj ..` (C tiles `2 jj` and `2 jj + 1`) are, cast to the inputs'
//! dtype, the A fragment that multiplies the values without leaving the lane.

use cubecl::cmma::MmaDefinition;
use cubecl::prelude::*;

use super::flash_kernel::{load_row_keys, load_row_values, load_rows, mask_strides, readable, row_keys, row_value, row_vector, shared_row_keys, FLOOR};

/// Query rows of a cube: 16 a plane, four planes.
pub(super) const ROWS: usize = 64;
/// Keys of a block.
pub(super) const KEYS: usize = 64;
/// Units of a cube.
pub(super) const UNITS: usize = 128;

/// Rows `[row0, row0 + KEYS)` of head `head` of batch `batch` of `src` (`[batch, heads, seq, d]`,
/// as [`load_rows`] reads it) transposed into `dst` (`[d, KEYS]`, row stride `stride`), zeros past
/// `seq`. Consecutive units take consecutive rows, so the column-wise stores land on consecutive
/// banks.
#[cube]
fn load_rows_transposed<E: Float, N: Size>(
    src: &Tensor<Vector<E, N>>,
    batch: usize,
    head: usize,
    row0: usize,
    dst: &mut SharedMemory<E>,
    #[comptime] d: usize,
    #[comptime] stride: usize,
) {
    let width = src.vector_size();
    let per_row = comptime![d] / width;
    let mut i = UNIT_POS as usize;
    while i < KEYS * per_row {
        let r = i % KEYS;
        let c = (i / KEYS) * width;
        let x = row_vector::<E, N>(src, batch, head, row0 + r, c);
        #[unroll]
        for j in 0..width {
            dst[(c + j) * stride + r] = x[j];
        }
        i = i + CUBE_DIM as usize;
    }
}

/// Two consecutive elements of a shared tile as one fragment register.
#[cube]
fn pair<E: Float>(tile: &SharedMemory<E>, at: usize) -> Vector<E, Const<2>> {
    let mut x = Vector::<E, Const<2>>::empty();
    x[0] = tile[at];
    x[1] = tile[at + 1];
    x
}

/// An accumulator fragment of zeros (two registers of two f32).
#[cube]
fn zeros() -> Array<Vector<f32, Const<2>>> {
    let mut acc = Array::<Vector<f32, Const<2>>>::new(2usize);
    #[unroll]
    for i in 0..2usize {
        acc[i] = Vector::new(0.0);
    }
    acc
}

/// The A fragment of rows `row0 .. row0 + 16`, columns `col0 .. col0 + 16` of a row-major
/// shared tile of row stride `ld`.
#[cube]
fn a_fragment<E: Float>(tile: &SharedMemory<E>, row0: usize, col0: usize, #[comptime] ld: usize) -> Array<Vector<E, Const<2>>> {
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    let mut f = Array::<Vector<E, Const<2>>>::new(4usize);
    #[unroll]
    for i in 0..4usize {
        f[i] = pair::<E>(tile, (row0 + g + 8 * (i % 2)) * ld + col0 + 2 * t + 8 * (i / 2));
    }
    f
}

/// The B fragment (16 x 8, `k` by `n`) whose column `n` is row `n0 + n` of a shared tile stored
/// `[n][k]` (row stride `ld`), from element `k0` of that row: each register two consecutive `k`.
#[cube]
fn b_fragment<E: Float>(tile: &SharedMemory<E>, n0: usize, k0: usize, #[comptime] ld: usize) -> Array<Vector<E, Const<2>>> {
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    let mut b = Array::<Vector<E, Const<2>>>::new(2usize);
    #[unroll]
    for i in 0..2usize {
        b[i] = pair::<E>(tile, (n0 + g) * ld + k0 + 2 * t + 8 * i);
    }
    b
}

/// The A fragment of two C fragments side by side (`lo`: columns 0..8, `hi`: 8..16), cast to
/// the inputs' dtype: a lane's C registers are exactly its A registers.
#[cube]
fn a_of_c<E: Float>(lo: &Array<Vector<f32, Const<2>>>, hi: &Array<Vector<f32, Const<2>>>) -> Array<Vector<E, Const<2>>> {
    let mut f = Array::<Vector<E, Const<2>>>::new(4usize);
    f[0] = Vector::cast_from(lo[0]);
    f[1] = Vector::cast_from(lo[1]);
    f[2] = Vector::cast_from(hi[0]);
    f[3] = Vector::cast_from(hi[1]);
    f
}

/// The larger of `x` over the four lanes of this lane's quad (the lanes holding the same rows).
#[cube]
fn quad_max(x: f32) -> f32 {
    let y = f32::max(x, plane_shuffle_xor(x, 1));
    f32::max(y, plane_shuffle_xor(y, 2))
}

/// The sum of `x` over the four lanes of this lane's quad.
#[cube]
fn quad_sum(x: f32) -> f32 {
    let y = x + plane_shuffle_xor(x, 1);
    y + plane_shuffle_xor(y, 2)
}

/// [`super::flash_kernel::flash_forward`]'s contract, on CUDA tensor cores with `d` a multiple
/// of 16 (at most 128: the output's registers): one cube of [`UNITS`] per [`ROWS`] query rows of
/// one (batch, query head), cube `(x, y)`: query block `x`, `y = batch * q_heads + head`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(super) fn flash_forward_mma<E: Float, M: Int, N: Size>(
    q: &Tensor<Vector<E, N>>,
    k: &Tensor<Vector<E, N>>,
    v: &Tensor<Vector<E, N>>,
    mask: &Tensor<M>,
    keys: &Tensor<i32>,
    out: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    scale: f32,
    inf: f32,
    #[comptime] d: usize,
    #[comptime] causal: bool,
    #[define(E, M)] _dtypes: [StorageType; 2],
) {
    // Padded row strides (+8 elements): the quads' pair loads start on different banks.
    let ld = comptime![d + 8];
    let lv = comptime![KEYS + 8];
    let seq = q.shape(2);
    let q_heads = q.shape(1);
    let groups = q_heads / k.shape(1);
    let bh = CUBE_POS_Y as usize;
    let batch = bh / q_heads;
    let head = bh % q_heads;
    let strides = mask_strides::<M>(mask, batch);
    let q0 = CUBE_POS_X as usize * ROWS;
    let plane = UNIT_POS as usize / 32;
    let lane = UNIT_POS_PLANE as usize;
    let g = lane / 4;
    let t = lane % 4;
    // This lane's two rows, within the cube's block and in the sequence.
    let local = plane * 16 + g;
    let row_a = q0 + local;
    let row_b = row_a + 8;
    let keys_a = row_keys(keys, batch, row_a, seq);
    let keys_b = row_keys(keys, batch, row_b, seq);

    let mut q_s = SharedMemory::<E>::new_aligned(ROWS * ld, 128usize);
    let mut k_s = SharedMemory::<E>::new_aligned(KEYS * ld, 128usize);
    let mut vt_s = SharedMemory::<E>::new_aligned(d * lv, 128usize);
    load_rows::<E, N>(q, batch, head, q0, &mut q_s, ROWS, d, ld);
    sync_cube();
    let def = MmaDefinition::<E, E, f32>::new(16usize, 8usize, 16usize);

    // The plane's query rows as A fragments, one per 16 columns of the head dim.
    let mut qa = Sequence::<Array<Vector<E, Const<2>>>>::new();
    #[unroll]
    for kk in 0..comptime![d / 16] {
        qa.push(a_fragment::<E>(&q_s, plane * 16, kk * 16, ld));
    }
    // The output, one C fragment per 8 columns of the head dim; each row's running max
    // (`m_*`) and this lane's share of its running sum (`l_*`).
    let mut o = Sequence::<Array<Vector<f32, Const<2>>>>::new();
    #[unroll]
    for _dt in 0..comptime![d / 8] {
        o.push(zeros());
    }
    let mut m_a = f32::new(FLOOR);
    let mut m_b = f32::new(FLOOR);
    let mut l_a = f32::new(0.0);
    let mut l_b = f32::new(0.0);

    let mut kv_end = seq;
    if causal {
        if q0 + ROWS < seq {
            kv_end = q0 + ROWS;
        }
    }
    let blocks = (kv_end + KEYS - 1) / KEYS;
    let kv_head = head / groups;
    for blk in 0..blocks {
        let k0 = blk * KEYS;
        // Every plane is done with the previous block's tiles.
        sync_cube();
        load_rows::<E, N>(k, batch, kv_head, k0, &mut k_s, KEYS, d, ld);
        load_rows_transposed::<E, N>(v, batch, kv_head, k0, &mut vt_s, d, lv);
        sync_cube();

        // Scores: C fragment `j` holds keys `8 j ..` of the plane's 16 rows.
        let mut s = Sequence::<Array<Vector<f32, Const<2>>>>::new();
        #[unroll]
        for j in 0..comptime![KEYS / 8] {
            let mut acc = zeros();
            #[unroll]
            for kk in 0..comptime![d / 16] {
                def.execute_inplace(qa.index(kk), &b_fragment::<E>(&k_s, j * 8, kk * 16, ld), &mut acc);
            }
            s.push(acc);
        }

        // Scaled and masked; each row's max over the block.
        let mut max_a = f32::new(FLOOR);
        let mut max_b = f32::new(FLOOR);
        #[unroll]
        for j in 0..comptime![KEYS / 8] {
            let frag = s.index_mut(j);
            let mut xa = Vector::<f32, Const<2>>::new(FLOOR);
            let mut xb = Vector::<f32, Const<2>>::new(FLOOR);
            #[unroll]
            for c in 0..2usize {
                let key = k0 + j * 8 + 2 * t + c;
                if readable::<M>(mask, strides, keys_a, row_a, key, seq, causal) {
                    xa[c] = frag[0][c] * scale;
                }
                if readable::<M>(mask, strides, keys_b, row_b, key, seq, causal) {
                    xb[c] = frag[1][c] * scale;
                }
                max_a = f32::max(max_a, xa[c]);
                max_b = f32::max(max_b, xb[c]);
            }
            frag[0] = xa;
            frag[1] = xb;
        }
        let new_a = f32::max(m_a, quad_max(max_a));
        let new_b = f32::max(m_b, quad_max(max_b));
        // new >= old: alpha in [0, 1] (1 while the row has read nothing).
        let alpha_a = (m_a - new_a).exp();
        let alpha_b = (m_b - new_b).exp();
        m_a = new_a;
        m_b = new_b;

        // Probabilities in place of the scores, then as the A fragments of the product with
        // the values: keys `16 jj ..`.
        let mut sum_a = f32::new(0.0);
        let mut sum_b = f32::new(0.0);
        #[unroll]
        for j in 0..comptime![KEYS / 8] {
            let frag = s.index_mut(j);
            let mut pa_row = Vector::<f32, Const<2>>::new(0.0);
            let mut pb_row = Vector::<f32, Const<2>>::new(0.0);
            #[unroll]
            for c in 0..2usize {
                if frag[0][c] > FLOOR {
                    pa_row[c] = (frag[0][c] - new_a).exp();
                }
                if frag[1][c] > FLOOR {
                    pb_row[c] = (frag[1][c] - new_b).exp();
                }
                sum_a += pa_row[c];
                sum_b += pb_row[c];
            }
            frag[0] = pa_row;
            frag[1] = pb_row;
        }
        let mut pa = Sequence::<Array<Vector<E, Const<2>>>>::new();
        #[unroll]
        for jj in 0..comptime![KEYS / 16] {
            pa.push(a_of_c::<E>(s.index(2 * jj), s.index(2 * jj + 1)));
        }
        l_a = l_a * alpha_a + sum_a;
        l_b = l_b * alpha_b + sum_b;

        // o = o * alpha + P V, one C fragment per 8 columns of the head dim.
        #[unroll]
        for dt in 0..comptime![d / 8] {
            let acc = o.index_mut(dt);
            acc[0] = acc[0] * Vector::new(alpha_a);
            acc[1] = acc[1] * Vector::new(alpha_b);
            #[unroll]
            for jj in 0..comptime![KEYS / 16] {
                def.execute_inplace(pa.index(jj), &b_fragment::<E>(&vt_s, dt * 8, jj * 16, lv), acc);
            }
        }
    }

    let total_a = quad_sum(l_a);
    let total_b = quad_sum(l_b);
    let mut inv_a = f32::new(0.0);
    if total_a > 0.0 {
        inv_a = 1.0 / total_a;
    }
    let mut inv_b = f32::new(0.0);
    if total_b > 0.0 {
        inv_b = 1.0 / total_b;
    }
    #[unroll]
    for dt in 0..comptime![d / 8] {
        let acc = o.index(dt);
        #[unroll]
        for c in 0..2usize {
            let col = dt * 8 + 2 * t + c;
            if row_a < seq {
                out[(bh * seq + row_a) * d + col] = E::cast_from(acc[0][c] * inv_a);
            }
            if row_b < seq {
                out[(bh * seq + row_b) * d + col] = E::cast_from(acc[1][c] * inv_b);
            }
        }
    }
    if t == 0 {
        if row_a < seq {
            let mut value = inf;
            if total_a > 0.0 {
                value = m_a + total_a.ln();
            }
            lse[bh * seq + row_a] = value;
        }
        if row_b < seq {
            let mut value = inf;
            if total_b > 0.0 {
                value = m_b + total_b.ln();
            }
            lse[bh * seq + row_b] = value;
        }
    }
}

/// [`super::flash_kernel::flash_backward_q`]'s contract, on CUDA tensor cores with `d` a
/// multiple of 16 (at most 128): one cube of [`UNITS`] per [`ROWS`] query rows of one (batch,
/// query head). Each plane keeps its 16 rows' query and upstream-gradient fragments and their
/// `dQ` in registers; per key block, the scores `S = Q K^T` and `dP = dO V^T` come out in C
/// fragments, become `dS = P (dP - delta)` in place, and `dQ += dS K` reads them as A fragments
/// (keys staged transposed for it).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(super) fn flash_backward_q_mma<E: Float, M: Int, N: Size>(
    q: &Tensor<Vector<E, N>>,
    k: &Tensor<Vector<E, N>>,
    v: &Tensor<Vector<E, N>>,
    mask: &Tensor<M>,
    keys: &Tensor<i32>,
    d_out: &Tensor<Vector<E, N>>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    d_q: &mut Tensor<E>,
    scale: f32,
    #[comptime] d: usize,
    #[comptime] causal: bool,
    #[define(E, M)] _dtypes: [StorageType; 2],
) {
    let ld = comptime![d + 8];
    let lv = comptime![KEYS + 8];
    let seq = q.shape(2);
    let q_heads = q.shape(1);
    let groups = q_heads / k.shape(1);
    let bh = CUBE_POS_Y as usize;
    let batch = bh / q_heads;
    let head = bh % q_heads;
    let strides = mask_strides::<M>(mask, batch);
    let q0 = CUBE_POS_X as usize * ROWS;
    let plane = UNIT_POS as usize / 32;
    let lane = UNIT_POS_PLANE as usize;
    let g = lane / 4;
    let t = lane % 4;
    let row_a = q0 + plane * 16 + g;
    let row_b = row_a + 8;
    let keys_a = row_keys(keys, batch, row_a, seq);
    let keys_b = row_keys(keys, batch, row_b, seq);
    let (lse_a, lse_b) = (row_value(lse, batch, head, row_a), row_value(lse, batch, head, row_b));
    let (delta_a, delta_b) = (row_value(delta, batch, head, row_a), row_value(delta, batch, head, row_b));

    let mut q_s = SharedMemory::<E>::new_aligned(ROWS * ld, 128usize);
    let mut do_s = SharedMemory::<E>::new_aligned(ROWS * ld, 128usize);
    let mut k_s = SharedMemory::<E>::new_aligned(KEYS * ld, 128usize);
    let mut kt_s = SharedMemory::<E>::new_aligned(d * lv, 128usize);
    let mut v_s = SharedMemory::<E>::new_aligned(KEYS * ld, 128usize);
    load_rows::<E, N>(q, batch, head, q0, &mut q_s, ROWS, d, ld);
    load_rows::<E, N>(d_out, batch, head, q0, &mut do_s, ROWS, d, ld);
    sync_cube();
    let def = MmaDefinition::<E, E, f32>::new(16usize, 8usize, 16usize);
    let mut qa = Sequence::<Array<Vector<E, Const<2>>>>::new();
    let mut doa = Sequence::<Array<Vector<E, Const<2>>>>::new();
    #[unroll]
    for kk in 0..comptime![d / 16] {
        qa.push(a_fragment::<E>(&q_s, plane * 16, kk * 16, ld));
        doa.push(a_fragment::<E>(&do_s, plane * 16, kk * 16, ld));
    }
    let mut dq = Sequence::<Array<Vector<f32, Const<2>>>>::new();
    #[unroll]
    for _dt in 0..comptime![d / 8] {
        dq.push(zeros());
    }

    let mut kv_end = seq;
    if causal {
        if q0 + ROWS < seq {
            kv_end = q0 + ROWS;
        }
    }
    let blocks = (kv_end + KEYS - 1) / KEYS;
    let kv_head = head / groups;
    for blk in 0..blocks {
        let k0 = blk * KEYS;
        sync_cube();
        load_rows::<E, N>(k, batch, kv_head, k0, &mut k_s, KEYS, d, ld);
        load_rows_transposed::<E, N>(k, batch, kv_head, k0, &mut kt_s, d, lv);
        load_rows::<E, N>(v, batch, kv_head, k0, &mut v_s, KEYS, d, ld);
        sync_cube();

        // dS = P (dP - delta) of keys `8 j ..`, in the scores' C fragments.
        let mut ds = Sequence::<Array<Vector<f32, Const<2>>>>::new();
        #[unroll]
        for j in 0..comptime![KEYS / 8] {
            let mut s = zeros();
            let mut dp = zeros();
            #[unroll]
            for kk in 0..comptime![d / 16] {
                def.execute_inplace(qa.index(kk), &b_fragment::<E>(&k_s, j * 8, kk * 16, ld), &mut s);
                def.execute_inplace(doa.index(kk), &b_fragment::<E>(&v_s, j * 8, kk * 16, ld), &mut dp);
            }
            let mut ra = Vector::<f32, Const<2>>::new(0.0);
            let mut rb = Vector::<f32, Const<2>>::new(0.0);
            #[unroll]
            for c in 0..2usize {
                let key = k0 + j * 8 + 2 * t + c;
                if readable::<M>(mask, strides, keys_a, row_a, key, seq, causal) {
                    ra[c] = (s[0][c] * scale - lse_a).exp() * (dp[0][c] - delta_a);
                }
                if readable::<M>(mask, strides, keys_b, row_b, key, seq, causal) {
                    rb[c] = (s[1][c] * scale - lse_b).exp() * (dp[1][c] - delta_b);
                }
            }
            s[0] = ra;
            s[1] = rb;
            ds.push(s);
        }
        let mut da = Sequence::<Array<Vector<E, Const<2>>>>::new();
        #[unroll]
        for jj in 0..comptime![KEYS / 16] {
            da.push(a_of_c::<E>(ds.index(2 * jj), ds.index(2 * jj + 1)));
        }
        // dQ += dS K.
        #[unroll]
        for dt in 0..comptime![d / 8] {
            let acc = dq.index_mut(dt);
            #[unroll]
            for jj in 0..comptime![KEYS / 16] {
                def.execute_inplace(da.index(jj), &b_fragment::<E>(&kt_s, dt * 8, jj * 16, lv), acc);
            }
        }
    }

    #[unroll]
    for dt in 0..comptime![d / 8] {
        let acc = dq.index(dt);
        #[unroll]
        for c in 0..2usize {
            let col = dt * 8 + 2 * t + c;
            if row_a < seq {
                d_q[(bh * seq + row_a) * d + col] = E::cast_from(acc[0][c] * scale);
            }
            if row_b < seq {
                d_q[(bh * seq + row_b) * d + col] = E::cast_from(acc[1][c] * scale);
            }
        }
    }
}

/// [`super::flash_kernel::flash_backward_kv`]'s contract, on CUDA tensor cores with `d` a
/// multiple of 16 (at most 128): one cube of [`UNITS`] per [`KEYS`] keys of one (batch, kv
/// head), cube `(x, y)`: key block `x`, `y = batch * kv_heads + kv_head`. Each plane keeps its 16
/// keys' `dK` and `dV` in registers over every query block of the kv head's query heads; the
/// transposed scores `S^T = K Q^T` and `dP^T = V dO^T` come out in C fragments (keys by
/// queries), become `P^T` and `dS^T`, and multiply the queries and upstream gradients (staged
/// transposed) as A fragments.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(super) fn flash_backward_kv_mma<E: Float, M: Int, N: Size>(
    q: &Tensor<Vector<E, N>>,
    k: &Tensor<Vector<E, N>>,
    v: &Tensor<Vector<E, N>>,
    mask: &Tensor<M>,
    keys: &Tensor<i32>,
    d_out: &Tensor<Vector<E, N>>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    d_k: &mut Tensor<E>,
    d_v: &mut Tensor<E>,
    scale: f32,
    #[comptime] d: usize,
    #[comptime] causal: bool,
    #[define(E, M)] _dtypes: [StorageType; 2],
) {
    let ld = comptime![d + 8];
    let lv = comptime![ROWS + 8];
    let seq = q.shape(2);
    let kv_heads = k.shape(1);
    let groups = q.shape(1) / kv_heads;
    let bh = CUBE_POS_Y as usize;
    let batch = bh / kv_heads;
    let kv_head = bh % kv_heads;
    let strides = mask_strides::<M>(mask, batch);
    let k0 = CUBE_POS_X as usize * KEYS;
    let plane = UNIT_POS as usize / 32;
    let lane = UNIT_POS_PLANE as usize;
    let g = lane / 4;
    let t = lane % 4;
    // This lane's two keys.
    let key_a = k0 + plane * 16 + g;
    let key_b = key_a + 8;

    let mut k_s = SharedMemory::<E>::new_aligned(KEYS * ld, 128usize);
    let mut v_s = SharedMemory::<E>::new_aligned(KEYS * ld, 128usize);
    let mut q_s = SharedMemory::<E>::new_aligned(ROWS * ld, 128usize);
    let mut do_s = SharedMemory::<E>::new_aligned(ROWS * ld, 128usize);
    let mut qt_s = SharedMemory::<E>::new_aligned(d * lv, 128usize);
    let mut dot_s = SharedMemory::<E>::new_aligned(d * lv, 128usize);
    let mut lse_s = SharedMemory::<f32>::new(ROWS);
    let mut delta_s = SharedMemory::<f32>::new(ROWS);
    let mut keys_s = SharedMemory::<i32>::new(ROWS * 3);
    load_rows::<E, N>(k, batch, kv_head, k0, &mut k_s, KEYS, d, ld);
    load_rows::<E, N>(v, batch, kv_head, k0, &mut v_s, KEYS, d, ld);
    let def = MmaDefinition::<E, E, f32>::new(16usize, 8usize, 16usize);
    let mut dk = Sequence::<Array<Vector<f32, Const<2>>>>::new();
    let mut dv = Sequence::<Array<Vector<f32, Const<2>>>>::new();
    #[unroll]
    for _dt in 0..comptime![d / 8] {
        dk.push(zeros());
        dv.push(zeros());
    }

    // Query blocks that read a key of this block: with causal, those ending after its first key.
    let mut first = 0;
    if causal {
        first = k0 / ROWS;
    }
    let q_blocks = (seq + ROWS - 1) / ROWS;
    for h in 0..groups {
        let head = kv_head * groups + h;
        for qb in first..q_blocks {
            let q0 = qb * ROWS;
            sync_cube();
            load_rows::<E, N>(q, batch, head, q0, &mut q_s, ROWS, d, ld);
            load_rows_transposed::<E, N>(q, batch, head, q0, &mut qt_s, d, lv);
            load_rows::<E, N>(d_out, batch, head, q0, &mut do_s, ROWS, d, ld);
            load_rows_transposed::<E, N>(d_out, batch, head, q0, &mut dot_s, d, lv);
            load_row_values(lse, batch, head, q0, &mut lse_s, ROWS);
            load_row_values(delta, batch, head, q0, &mut delta_s, ROWS);
            load_row_keys(keys, batch, q0, seq, &mut keys_s, ROWS);
            sync_cube();

            // P^T and dS^T of queries `8 j ..` (C fragments: the plane's keys by queries).
            let mut pt = Sequence::<Array<Vector<f32, Const<2>>>>::new();
            let mut dst = Sequence::<Array<Vector<f32, Const<2>>>>::new();
            #[unroll]
            for j in 0..comptime![ROWS / 8] {
                let mut s = zeros();
                let mut dp = zeros();
                #[unroll]
                for kk in 0..comptime![d / 16] {
                    let b_q = b_fragment::<E>(&q_s, j * 8, kk * 16, ld);
                    def.execute_inplace(&a_fragment::<E>(&k_s, plane * 16, kk * 16, ld), &b_q, &mut s);
                    let b_do = b_fragment::<E>(&do_s, j * 8, kk * 16, ld);
                    def.execute_inplace(&a_fragment::<E>(&v_s, plane * 16, kk * 16, ld), &b_do, &mut dp);
                }
                let mut p = zeros();
                let mut ds = zeros();
                #[unroll]
                for c in 0..2usize {
                    let r = j * 8 + 2 * t + c;
                    let query = q0 + r;
                    let row = shared_row_keys(&keys_s, r);
                    let (row_lse, row_delta) = (lse_s[r], delta_s[r]);
                    #[unroll]
                    for i in 0..2usize {
                        let mut key = key_a;
                        if i == 1 {
                            key = key_b;
                        }
                        let mut x = f32::new(0.0);
                        if readable::<M>(mask, strides, row, query, key, seq, causal) {
                            x = (s[i][c] * scale - row_lse).exp();
                        }
                        let mut pr = p[i];
                        pr[c] = x;
                        p[i] = pr;
                        let mut dr = ds[i];
                        dr[c] = x * (dp[i][c] - row_delta);
                        ds[i] = dr;
                    }
                }
                pt.push(p);
                dst.push(ds);
            }
            let mut pa = Sequence::<Array<Vector<E, Const<2>>>>::new();
            let mut da = Sequence::<Array<Vector<E, Const<2>>>>::new();
            #[unroll]
            for jj in 0..comptime![ROWS / 16] {
                pa.push(a_of_c::<E>(pt.index(2 * jj), pt.index(2 * jj + 1)));
                da.push(a_of_c::<E>(dst.index(2 * jj), dst.index(2 * jj + 1)));
            }
            // dV += P^T dO, dK += dS^T Q (scaled once at the end).
            #[unroll]
            for dt in 0..comptime![d / 8] {
                #[unroll]
                for jj in 0..comptime![ROWS / 16] {
                    def.execute_inplace(pa.index(jj), &b_fragment::<E>(&dot_s, dt * 8, jj * 16, lv), dv.index_mut(dt));
                    def.execute_inplace(da.index(jj), &b_fragment::<E>(&qt_s, dt * 8, jj * 16, lv), dk.index_mut(dt));
                }
            }
        }
    }

    #[unroll]
    for dt in 0..comptime![d / 8] {
        let (gk, gv) = (dk.index(dt), dv.index(dt));
        #[unroll]
        for c in 0..2usize {
            let col = dt * 8 + 2 * t + c;
            if key_a < seq {
                d_k[(bh * seq + key_a) * d + col] = E::cast_from(gk[0][c] * scale);
                d_v[(bh * seq + key_a) * d + col] = E::cast_from(gv[0][c]);
            }
            if key_b < seq {
                d_k[(bh * seq + key_b) * d + col] = E::cast_from(gk[1][c] * scale);
                d_v[(bh * seq + key_b) * d + col] = E::cast_from(gv[1][c]);
            }
        }
    }
}
