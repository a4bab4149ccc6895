//! FlashAttention-2's kernels with their accumulators in registers (Dao, 2023, section 3.1):
//! CUDA's warp-level tensor-core product `mma.sync` m16n8k16 (bf16/f16 into f32) through
//! CubeCL's manual `MmaDefinition`, where [`super::flash_kernel`]'s kernels keep their scores and
//! output in shared memory (CubeCL's `cmma` fragments cannot be rescaled per row).
//!
//! A cube of four planes takes 64 query rows (or, for the keys' gradients, 64 keys), 16 a plane,
//! and walks the blocks of 64 on the other side: each plane holds its rows' scores, output (or
//! gradients) and softmax statistics in registers; the tiles in shared memory are the inputs,
//! row-major as stored, copied by `cp.async` ([`super::flash_copy`]: the tiles walked over hold
//! two blocks, the next block's copies in flight while this one is computed). Fragments come
//! out of them through `ldmatrix` (four 8x8 matrices an instruction), transposed by the
//! instruction where a product needs a tile's columns (`P V`: the values by key; `dS K`, `P^T
//! dO`, `dS^T Q`), so no tile is staged transposed. A lane holds two rows of each fragment (`g` and `g + 8`, `g = lane / 4`),
//! so a row's max and sum are reduced over the four lanes of its quad.
//!
//! The fragments' layouts are PTX's for m16n8k16, with `g = lane / 4`, `t = lane % 4`, each
//! register two consecutive elements:
//! - A (16x16, row-major): register `i` holds row `g + 8 (i % 2)`, columns `2t + 8 (i / 2) + {0, 1}`;
//! - B (16x8): register `i` holds rows (k) `2t + 8 i + {0, 1}` of column (n) `g`;
//! - C (16x8, f32): register `i` holds row `g + 8 i`, columns `2t + {0, 1}`.
//!
//! So the scores of keys `16 jj ..` (C tiles `2 jj` and `2 jj + 1`) are, cast to the inputs'
//! dtype, the A fragment that multiplies the values without leaving the lane.
//!
//! Exponentials run as FlashAttention's do: the scale folded into one fused multiply-add and the
//! hardware's `ex2.approx` (CubeCL's reduced-precision math gives `__expf`, where `expf` costs
//! about ten instructions a score).
//!
//! Only the blocks that meet a row's bounds (the causal diagonal, a packed segment's edges,
//! padding, a mask that is not one interval a row) are masked score by score; the others skip
//! the mask, and a query block walks only the key blocks its rows may read.

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;

use super::flash_copy::{copy_next, copy_tile, first_key_tiles, head_rows, wait_tiles};
use super::flash_kernel::{
    load_row_keys, load_row_values, mask_strides, readable, MaskStrides, reads_block, row_end_key, row_first_key, row_keys, row_value, shared_row_keys, RowKeys, FLOOR,
};

/// Query rows of a cube: 16 a plane, four planes.
pub(super) const ROWS: usize = 64;
/// Keys of a block.
pub(super) const KEYS: usize = 64;
/// Units of a cube.
pub(super) const UNITS: usize = 128;

/// Elements a tile row is padded by: rows `d + 8` long put the eight rows of an `ldmatrix` on
/// distinct banks and keep every row start 16-byte aligned.
pub(super) const PAD: usize = 8;

type Frag<E> = Array<Vector<E, Const<2>>>;

/// A shared tile of `rows` rows of `d` inputs (row stride `d + PAD`), in vectors of the inputs'
/// width.
#[cube]
fn tile<E: Float, N: Size>(#[comptime] rows: usize, #[comptime] d: usize, #[comptime] width: usize) -> SharedMemory<Vector<E, N>> {
    SharedMemory::<Vector<E, N>>::new_aligned(comptime![rows * (d + PAD) / width], 128usize)
}

/// The `ldmatrix` of four 8x8 matrices whose rows this lane addresses: row `row0 + lane_row`,
/// columns `col0 + lane_col ..` (8 of them) of a tile of row stride `d + PAD`. The lane's part
/// and the fragment's part of the address are kept apart (`col0`, `lane_col` multiples of 8), so
/// the compiler shares the lane's part across fragments and folds the rest into the
/// instruction's immediate offset, instead of holding an address register a fragment.
#[cube]
#[allow(clippy::too_many_arguments)]
fn ldmatrix4<E: Float, N: Size>(
    def: &MmaDefinition<E, E, f32>,
    tile: &SharedMemory<Vector<E, N>>,
    row0: usize,
    col0: usize,
    lane_row: usize,
    lane_col: usize,
    #[comptime] d: usize,
    #[comptime] width: usize,
    #[comptime] transpose: bool,
) -> Frag<E> {
    let stride = comptime![(d + PAD) / width];
    let start = (lane_row * stride + lane_col / width) + (row0 * stride + col0 / width);
    def.load_matrix::<Vector<E, N>, Const<2>>(&tile.slice(start, start + comptime![8 / width]), MatrixIdent::A, 4usize, transpose)
}

/// The A fragment of rows `row0 .. row0 + 16`, columns `col0 .. col0 + 16`.
#[cube]
fn a_fragment<E: Float, N: Size>(def: &MmaDefinition<E, E, f32>, tile: &SharedMemory<Vector<E, N>>, row0: usize, col0: usize, #[comptime] d: usize, #[comptime] width: usize) -> Frag<E> {
    let lane = UNIT_POS_PLANE as usize;
    ldmatrix4::<E, N>(def, tile, row0, col0, lane % 16, (lane / 16) * 8, d, width, false)
}

/// The B fragments of two 16x8 products whose columns are rows `n0 .. n0 + 8` and `n0 + 8 .. n0
/// + 16` of a tile, from element `k0` of those rows (B = the tile's rows transposed: `Q K^T`),
/// as registers `[0, 1]` and `[2, 3]`.
#[cube]
fn b_of_rows<E: Float, N: Size>(def: &MmaDefinition<E, E, f32>, tile: &SharedMemory<Vector<E, N>>, n0: usize, k0: usize, #[comptime] d: usize, #[comptime] width: usize) -> Frag<E> {
    let lane = UNIT_POS_PLANE as usize;
    let m = lane / 8;
    ldmatrix4::<E, N>(def, tile, n0, k0, lane % 8 + 8 * (m / 2), 8 * (m % 2), d, width, false)
}

/// The B fragments of two 16x8 products whose `k` runs over rows `k0 .. k0 + 16` of a tile and
/// whose columns are the tile's columns `n0 .. n0 + 8` and `n0 + 8 .. n0 + 16` (B = the tile
/// itself: `P V`), as registers `[0, 1]` and `[2, 3]`.
#[cube]
fn b_of_columns<E: Float, N: Size>(def: &MmaDefinition<E, E, f32>, tile: &SharedMemory<Vector<E, N>>, k0: usize, n0: usize, #[comptime] d: usize, #[comptime] width: usize) -> Frag<E> {
    let lane = UNIT_POS_PLANE as usize;
    let m = lane / 8;
    ldmatrix4::<E, N>(def, tile, k0, n0, lane % 8 + 8 * (m % 2), 8 * (m / 2), d, width, true)
}

/// Registers `2 i` and `2 i + 1` of a pair of B fragments.
#[cube]
fn half<E: Float>(b: &Frag<E>, #[comptime] i: usize) -> Frag<E> {
    let mut f = Array::<Vector<E, Const<2>>>::new(2usize);
    f[0] = b[2 * i];
    f[1] = b[2 * i + 1];
    f
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

/// The A fragment of two C fragments side by side (`lo`: columns 0..8, `hi`: 8..16), cast to
/// the inputs' dtype: a lane's C registers are exactly its A registers.
#[cube]
fn a_of_c<E: Float>(lo: &Array<Vector<f32, Const<2>>>, hi: &Array<Vector<f32, Const<2>>>) -> Frag<E> {
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

/// The key blocks `[first, end)` that any of the cube's [`ROWS`] rows (from `q0`) may read, given
/// each lane's two rows: packed segments and padding leave a query block only the blocks of its
/// own segments to walk, and with `causal` none after its last row. Reduced over each plane with
/// shuffles, then over the four planes through shared memory; every unit gets the same range.
/// Synchronises the cube.
#[cube]
fn key_blocks(keys_a: RowKeys, keys_b: RowKeys, q0: usize, seq: usize, #[comptime] causal: bool) -> (usize, usize) {
    let mut kv_end = seq;
    if causal {
        kv_end = usize::min(seq, q0 + ROWS);
    }
    let mut span_s = SharedMemory::<u32>::new(8usize);
    let first = plane_min(u32::cast_from(usize::min(row_first_key(keys_a, seq), row_first_key(keys_b, seq))));
    let end = plane_max(u32::cast_from(usize::max(row_end_key(keys_a, seq), row_end_key(keys_b, seq))));
    let plane = UNIT_POS as usize / 32;
    if UNIT_POS_PLANE == 0 {
        span_s[plane] = first;
        span_s[4 + plane] = end;
    }
    sync_cube();
    let mut lo = span_s[0];
    let mut hi = span_s[4];
    #[unroll]
    for p in 1..comptime![UNITS / 32] {
        lo = u32::min(lo, span_s[p]);
        hi = u32::max(hi, span_s[4 + p]);
    }
    let hi = usize::min(usize::cast_from(hi), kv_end);
    let first_block = usize::cast_from(lo) / KEYS;
    let mut end_block = first_block;
    if hi > usize::cast_from(lo) {
        end_block = (hi + KEYS - 1) / KEYS;
    }
    (first_block, end_block)
}

/// A row's largest raw score `max` scaled, or [`FLOOR`] where the row read no key (`max` is
/// FLOOR).
#[cube]
fn scaled_max(max: f32, scale: f32) -> f32 {
    let mut m = f32::new(FLOOR);
    if max > FLOOR {
        m = max * scale;
    }
    m
}

/// The scores of a plane's 16 rows against a key block, not yet scaled (the caller folds the
/// scale into its exponent's one fused multiply-add), in C fragments `j` (keys `8 j ..`): `q` the
/// rows' A fragments, `k_s` the block's keys from its row `key_row0`. Masked scores are
/// [`FLOOR`]; where `full` (every row of the plane reads every key of the block) nothing is
/// masked.
#[cube]
#[allow(clippy::too_many_arguments)]
fn block_scores<E: Float, N: Size, M: Int>(
    def: &MmaDefinition<E, E, f32>,
    q: &Sequence<Frag<E>>,
    k_s: &SharedMemory<Vector<E, N>>,
    key_row0: usize,
    mask: &Tensor<M>,
    strides: MaskStrides,
    keys_a: RowKeys,
    keys_b: RowKeys,
    row_a: usize,
    row_b: usize,
    k0: usize,
    seq: usize,
    full: bool,
    #[comptime] d: usize,
    #[comptime] width: usize,
    #[comptime] causal: bool,
) -> Sequence<Array<Vector<f32, Const<2>>>> {
    let t = UNIT_POS_PLANE as usize % 4;
    let mut s = Sequence::<Array<Vector<f32, Const<2>>>>::new();
    #[unroll]
    for _j in 0..comptime![KEYS / 8] {
        s.push(zeros());
    }
    #[unroll]
    for jp in 0..comptime![KEYS / 16] {
        #[unroll]
        for kk in 0..comptime![d / 16] {
            let b = b_of_rows::<E, N>(def, k_s, key_row0 + jp * 16, kk * 16, d, width);
            def.execute_inplace(q.index(kk), &half::<E>(&b, 0usize), s.index_mut(2 * jp));
            def.execute_inplace(q.index(kk), &half::<E>(&b, 1usize), s.index_mut(2 * jp + 1));
        }
    }
    if !full {
        #[unroll]
        for j in 0..comptime![KEYS / 8] {
            let frag = s.index_mut(j);
            let mut xa = Vector::<f32, Const<2>>::new(FLOOR);
            let mut xb = Vector::<f32, Const<2>>::new(FLOOR);
            #[unroll]
            for c in 0..2usize {
                let key = k0 + j * 8 + 2 * t + c;
                if readable::<M>(mask, strides, keys_a, row_a, key, seq, causal) {
                    xa[c] = frag[0][c];
                }
                if readable::<M>(mask, strides, keys_b, row_b, key, seq, causal) {
                    xb[c] = frag[1][c];
                }
            }
            frag[0] = xa;
            frag[1] = xb;
        }
    }
    s
}

/// Whether every row of this plane (this lane's `row_a` and `row_b`, over the plane) reads every
/// key of the block at `k0`.
#[cube]
fn plane_reads_block(keys_a: RowKeys, keys_b: RowKeys, row_a: usize, row_b: usize, k0: usize, seq: usize, #[comptime] causal: bool) -> bool {
    plane_all(reads_block(keys_a, row_a, k0, KEYS, seq, causal) && reads_block(keys_b, row_b, k0, KEYS, seq, causal))
}

/// [`super::flash_kernel::flash_forward`]'s contract, on CUDA tensor cores with `d` a multiple
/// of 16 (at most 128: the output's registers): one cube of [`UNITS`] per [`ROWS`] query rows of
/// one (batch, query head), cube `(x, y)`: query block `x`, `y = batch * q_heads + head`.
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
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
    let width = q.vector_size();
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
    let t = lane % 4;
    // This lane's two rows in the sequence.
    let row_a = q0 + plane * 16 + lane / 4;
    let row_b = row_a + 8;
    let keys_a = row_keys(keys, batch, row_a, seq);
    let keys_b = row_keys(keys, batch, row_b, seq);

    let kv_head = head / groups;
    let (k_rows, v_rows) = (head_rows::<E, N>(k, batch, kv_head), head_rows::<E, N>(v, batch, kv_head));
    let mut q_s = tile::<E, N>(ROWS, d, width);
    let mut k_s = tile::<E, N>(2 * KEYS, d, width);
    let mut v_s = tile::<E, N>(2 * KEYS, d, width);
    let bar_0 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar_1 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    copy_tile::<E, N>(q, head_rows::<E, N>(q, batch, head), q0, &mut q_s, 0usize, ROWS, d);
    let (first_block, end_block) = key_blocks(keys_a, keys_b, q0, seq, causal);
    first_key_tiles::<E, N>(k, k_rows, v, v_rows, &mut k_s, &mut v_s, &bar_0, first_block, end_block, d);
    let def = MmaDefinition::<E, E, f32>::new(16usize, 8usize, 16usize);

    // The plane's query rows as A fragments, one per 16 columns of the head dim.
    let mut qa = Sequence::<Frag<E>>::new();
    #[unroll]
    for kk in 0..comptime![d / 16] {
        qa.push(a_fragment::<E, N>(&def, &q_s, plane * 16, kk * 16, d, width));
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

    for blk in first_block..end_block {
        let k0 = blk * KEYS;
        let i = blk - first_block;
        if blk + 1 < end_block {
            // Every plane is done with block `blk - 1`, whose half the next block takes.
            sync_cube();
            copy_next::<E, N>(k, k_rows, v, v_rows, k0 + KEYS, &mut k_s, &mut v_s, &bar_0, &bar_1, i, KEYS, d);
        }
        let at = wait_tiles(&bar_0, &bar_1, i, KEYS);

        let full = plane_reads_block(keys_a, keys_b, row_a, row_b, k0, seq, causal);
        let mut s = block_scores::<E, N, M>(&def, &qa, &k_s, at, mask, strides, keys_a, keys_b, row_a, row_b, k0, seq, full, d, width, causal);

        // Each row's max over the block, scaled (the scale is positive); a row that reads none of
        // the block's keys keeps FLOOR.
        let mut max_a = f32::new(FLOOR);
        let mut max_b = f32::new(FLOOR);
        #[unroll]
        for j in 0..comptime![KEYS / 8] {
            let frag = s.index(j);
            max_a = f32::max(max_a, f32::max(frag[0][0], frag[0][1]));
            max_b = f32::max(max_b, f32::max(frag[1][0], frag[1][1]));
        }
        let new_a = f32::max(m_a, scaled_max(quad_max(max_a), scale));
        let new_b = f32::max(m_b, scaled_max(quad_max(max_b), scale));
        // new >= old: alpha in [0, 1] (1 while the row has read nothing).
        let alpha_a = (m_a - new_a).exp();
        let alpha_b = (m_b - new_b).exp();
        m_a = new_a;
        m_b = new_b;
        // A row that has read nothing yet subtracts 0, so its masked scores still give 0.
        let mut base_a = f32::new(0.0);
        if new_a > FLOOR {
            base_a = new_a;
        }
        let mut base_b = f32::new(0.0);
        if new_b > FLOOR {
            base_b = new_b;
        }

        // Probabilities in place of the scores, then as the A fragments of the product with
        // the values: keys `16 jj ..`.
        let mut sum_a = f32::new(0.0);
        let mut sum_b = f32::new(0.0);
        #[unroll]
        for j in 0..comptime![KEYS / 8] {
            let frag = s.index_mut(j);
            let pa_row = (frag[0] * Vector::new(scale) - Vector::new(base_a)).exp();
            let pb_row = (frag[1] * Vector::new(scale) - Vector::new(base_b)).exp();
            sum_a += pa_row[0] + pa_row[1];
            sum_b += pb_row[0] + pb_row[1];
            frag[0] = pa_row;
            frag[1] = pb_row;
        }
        let mut pa = Sequence::<Frag<E>>::new();
        #[unroll]
        for jj in 0..comptime![KEYS / 16] {
            pa.push(a_of_c::<E>(s.index(2 * jj), s.index(2 * jj + 1)));
        }
        l_a = l_a * alpha_a + sum_a;
        l_b = l_b * alpha_b + sum_b;

        // o = o * alpha + P V, C fragments of 8 columns of the head dim, two at a time.
        #[unroll]
        for dt in 0..comptime![d / 8] {
            let acc = o.index_mut(dt);
            acc[0] = acc[0] * Vector::new(alpha_a);
            acc[1] = acc[1] * Vector::new(alpha_b);
        }
        #[unroll]
        for dp in 0..comptime![d / 16] {
            #[unroll]
            for jj in 0..comptime![KEYS / 16] {
                let b = b_of_columns::<E, N>(&def, &v_s, at + jj * 16, dp * 16, d, width);
                def.execute_inplace(pa.index(jj), &half::<E>(&b, 0usize), o.index_mut(2 * dp));
                def.execute_inplace(pa.index(jj), &half::<E>(&b, 1usize), o.index_mut(2 * dp + 1));
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
/// fragments, become `dS = P (dP - delta)` in place, and `dQ += dS K` reads them as A fragments.
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
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
    let width = q.vector_size();
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
    let t = lane % 4;
    let row_a = q0 + plane * 16 + lane / 4;
    let row_b = row_a + 8;
    let keys_a = row_keys(keys, batch, row_a, seq);
    let keys_b = row_keys(keys, batch, row_b, seq);
    let (lse_a, lse_b) = (row_value(lse, batch, head, row_a), row_value(lse, batch, head, row_b));
    let (delta_a, delta_b) = (row_value(delta, batch, head, row_a), row_value(delta, batch, head, row_b));

    let kv_head = head / groups;
    let (k_rows, v_rows) = (head_rows::<E, N>(k, batch, kv_head), head_rows::<E, N>(v, batch, kv_head));
    let mut q_s = tile::<E, N>(ROWS, d, width);
    let mut do_s = tile::<E, N>(ROWS, d, width);
    let mut k_s = tile::<E, N>(2 * KEYS, d, width);
    let mut v_s = tile::<E, N>(2 * KEYS, d, width);
    let bar_0 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar_1 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    copy_tile::<E, N>(q, head_rows::<E, N>(q, batch, head), q0, &mut q_s, 0usize, ROWS, d);
    copy_tile::<E, N>(d_out, head_rows::<E, N>(d_out, batch, head), q0, &mut do_s, 0usize, ROWS, d);
    let (first_block, end_block) = key_blocks(keys_a, keys_b, q0, seq, causal);
    first_key_tiles::<E, N>(k, k_rows, v, v_rows, &mut k_s, &mut v_s, &bar_0, first_block, end_block, d);
    let def = MmaDefinition::<E, E, f32>::new(16usize, 8usize, 16usize);
    let mut qa = Sequence::<Frag<E>>::new();
    let mut doa = Sequence::<Frag<E>>::new();
    #[unroll]
    for kk in 0..comptime![d / 16] {
        qa.push(a_fragment::<E, N>(&def, &q_s, plane * 16, kk * 16, d, width));
        doa.push(a_fragment::<E, N>(&def, &do_s, plane * 16, kk * 16, d, width));
    }
    let mut dq = Sequence::<Array<Vector<f32, Const<2>>>>::new();
    #[unroll]
    for _dt in 0..comptime![d / 8] {
        dq.push(zeros());
    }

    for blk in first_block..end_block {
        let k0 = blk * KEYS;
        let i = blk - first_block;
        if blk + 1 < end_block {
            // Every plane is done with block `blk - 1`, whose half the next block takes.
            sync_cube();
            copy_next::<E, N>(k, k_rows, v, v_rows, k0 + KEYS, &mut k_s, &mut v_s, &bar_0, &bar_1, i, KEYS, d);
        }
        let at = wait_tiles(&bar_0, &bar_1, i, KEYS);

        let full = plane_reads_block(keys_a, keys_b, row_a, row_b, k0, seq, causal);
        let mut s = block_scores::<E, N, M>(&def, &qa, &k_s, at, mask, strides, keys_a, keys_b, row_a, row_b, k0, seq, full, d, width, causal);
        // dP = dO V^T, the values' rows as B like the keys'.
        let mut dp = Sequence::<Array<Vector<f32, Const<2>>>>::new();
        #[unroll]
        for _j in 0..comptime![KEYS / 8] {
            dp.push(zeros());
        }
        #[unroll]
        for jp in 0..comptime![KEYS / 16] {
            #[unroll]
            for kk in 0..comptime![d / 16] {
                let b = b_of_rows::<E, N>(&def, &v_s, at + jp * 16, kk * 16, d, width);
                def.execute_inplace(doa.index(kk), &half::<E>(&b, 0usize), dp.index_mut(2 * jp));
                def.execute_inplace(doa.index(kk), &half::<E>(&b, 1usize), dp.index_mut(2 * jp + 1));
            }
        }
        // dS = P (dP - delta) in place of the scores (masked scores give P = 0).
        #[unroll]
        for j in 0..comptime![KEYS / 8] {
            let g = dp.index(j);
            let frag = s.index_mut(j);
            frag[0] = (frag[0] * Vector::new(scale) - Vector::new(lse_a)).exp() * (g[0] - Vector::new(delta_a));
            frag[1] = (frag[1] * Vector::new(scale) - Vector::new(lse_b)).exp() * (g[1] - Vector::new(delta_b));
        }
        let mut da = Sequence::<Frag<E>>::new();
        #[unroll]
        for jj in 0..comptime![KEYS / 16] {
            da.push(a_of_c::<E>(s.index(2 * jj), s.index(2 * jj + 1)));
        }
        // dQ += dS K: the keys by column.
        #[unroll]
        for dp2 in 0..comptime![d / 16] {
            #[unroll]
            for jj in 0..comptime![KEYS / 16] {
                let b = b_of_columns::<E, N>(&def, &k_s, at + jj * 16, dp2 * 16, d, width);
                def.execute_inplace(da.index(jj), &half::<E>(&b, 0usize), dq.index_mut(2 * dp2));
                def.execute_inplace(da.index(jj), &half::<E>(&b, 1usize), dq.index_mut(2 * dp2 + 1));
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

/// Whether every query row of a block (its [`load_row_keys`] table `keys_s`, rows from `q0`)
/// reads every key of the block at `k0`: each plane reads the whole table, two rows a lane.
#[cube]
fn block_reads_keys(keys_s: &SharedMemory<i32>, q0: usize, k0: usize, seq: usize, #[comptime] causal: bool) -> bool {
    let lane = UNIT_POS_PLANE as usize;
    let a = reads_block(shared_row_keys(keys_s, lane), q0 + lane, k0, KEYS, seq, causal);
    let b = reads_block(shared_row_keys(keys_s, lane + 32), q0 + lane + 32, k0, KEYS, seq, causal);
    plane_all(a && b)
}

/// [`super::flash_kernel::flash_backward_kv`]'s contract, on CUDA tensor cores with `d` a
/// multiple of 16 (at most 128): one cube of [`UNITS`] per [`KEYS`] keys of one (batch, kv
/// head), cube `(x, y)`: key block `x`, `y = batch * kv_heads + kv_head`. Each plane keeps its 16
/// keys' `dK` and `dV` in registers over every query block of the kv head's query heads; the
/// transposed scores `S^T = K Q^T` and `dP^T = V dO^T` come out in C fragments (keys by
/// queries), become `P^T` and `dS^T`, and multiply the queries and upstream gradients (by
/// column) as A fragments.
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
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
    let width = q.vector_size();
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
    let t = lane % 4;
    // This lane's two keys.
    let key_a = k0 + plane * 16 + lane / 4;
    let key_b = key_a + 8;

    // Query blocks that read a key of this block: with causal, those ending after its first key;
    // walked for each query head of the kv head, `blocks` a head.
    let mut first = 0;
    if causal {
        first = k0 / ROWS;
    }
    let q_blocks = (seq + ROWS - 1) / ROWS;
    let blocks = q_blocks - usize::min(first, q_blocks);
    let steps = groups * blocks;

    let mut k_s = tile::<E, N>(KEYS, d, width);
    let mut v_s = tile::<E, N>(KEYS, d, width);
    let mut q_s = tile::<E, N>(2 * ROWS, d, width);
    let mut do_s = tile::<E, N>(2 * ROWS, d, width);
    let mut lse_s = SharedMemory::<f32>::new(ROWS);
    let mut delta_s = SharedMemory::<f32>::new(ROWS);
    let mut keys_s = SharedMemory::<i32>::new(ROWS * 3);
    let bar_0 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar_1 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    // No copy is left in flight at the end: without steps, none starts.
    if steps > 0 {
        copy_tile::<E, N>(k, head_rows::<E, N>(k, batch, kv_head), k0, &mut k_s, 0usize, KEYS, d);
        copy_tile::<E, N>(v, head_rows::<E, N>(v, batch, kv_head), k0, &mut v_s, 0usize, KEYS, d);
        let head = kv_head * groups;
        copy_tile::<E, N>(q, head_rows::<E, N>(q, batch, head), first * ROWS, &mut q_s, 0usize, ROWS, d);
        copy_tile::<E, N>(d_out, head_rows::<E, N>(d_out, batch, head), first * ROWS, &mut do_s, 0usize, ROWS, d);
    }
    bar_0.commit_copy_async();
    let _arrived = bar_0.arrive();
    let def = MmaDefinition::<E, E, f32>::new(16usize, 8usize, 16usize);
    let mut dk = Sequence::<Array<Vector<f32, Const<2>>>>::new();
    let mut dv = Sequence::<Array<Vector<f32, Const<2>>>>::new();
    #[unroll]
    for _dt in 0..comptime![d / 8] {
        dk.push(zeros());
        dv.push(zeros());
    }

    for step in 0..steps {
        let head = kv_head * groups + step / blocks;
        let q0 = (first + step % blocks) * ROWS;
        // Every plane is done with step `step - 1`: its rows' values and the half the next
        // step's tiles take.
        sync_cube();
        if step + 1 < steps {
            let next = kv_head * groups + (step + 1) / blocks;
            let next_q0 = (first + (step + 1) % blocks) * ROWS;
            let (q_rows, do_rows) = (head_rows::<E, N>(q, batch, next), head_rows::<E, N>(d_out, batch, next));
            copy_next::<E, N>(q, q_rows, d_out, do_rows, next_q0, &mut q_s, &mut do_s, &bar_0, &bar_1, step, ROWS, d);
        }
        load_row_values(lse, batch, head, q0, &mut lse_s, ROWS);
        load_row_values(delta, batch, head, q0, &mut delta_s, ROWS);
        load_row_keys(keys, batch, q0, seq, &mut keys_s, ROWS);
        let at = wait_tiles(&bar_0, &bar_1, step, ROWS);
        sync_cube();
        let full = block_reads_keys(&keys_s, q0, k0, seq, causal);

        // P^T and dS^T of queries `8 j ..` (C fragments: the plane's keys by queries).
        let mut s = Sequence::<Array<Vector<f32, Const<2>>>>::new();
        let mut dp = Sequence::<Array<Vector<f32, Const<2>>>>::new();
        #[unroll]
        for _j in 0..comptime![ROWS / 8] {
            s.push(zeros());
            dp.push(zeros());
        }
        #[unroll]
        for kk in 0..comptime![d / 16] {
            let ka = a_fragment::<E, N>(&def, &k_s, plane * 16, kk * 16, d, width);
            let va = a_fragment::<E, N>(&def, &v_s, plane * 16, kk * 16, d, width);
            #[unroll]
            for jp in 0..comptime![ROWS / 16] {
                let b_q = b_of_rows::<E, N>(&def, &q_s, at + jp * 16, kk * 16, d, width);
                def.execute_inplace(&ka, &half::<E>(&b_q, 0usize), s.index_mut(2 * jp));
                def.execute_inplace(&ka, &half::<E>(&b_q, 1usize), s.index_mut(2 * jp + 1));
                let b_do = b_of_rows::<E, N>(&def, &do_s, at + jp * 16, kk * 16, d, width);
                def.execute_inplace(&va, &half::<E>(&b_do, 0usize), dp.index_mut(2 * jp));
                def.execute_inplace(&va, &half::<E>(&b_do, 1usize), dp.index_mut(2 * jp + 1));
            }
        }
        #[unroll]
        for j in 0..comptime![ROWS / 8] {
            let g = dp.index_mut(j);
            let frag = s.index_mut(j);
            #[unroll]
            for c in 0..2usize {
                let r = j * 8 + 2 * t + c;
                let (row_lse, row_delta) = (lse_s[r], delta_s[r]);
                #[unroll]
                for i in 0..2usize {
                    let mut x = f32::new(0.0);
                    if full {
                        x = (frag[i][c] * scale - row_lse).exp();
                    } else {
                        let mut key = key_a;
                        if i == 1 {
                            key = key_b;
                        }
                        if readable::<M>(mask, strides, shared_row_keys(&keys_s, r), q0 + r, key, seq, causal) {
                            x = (frag[i][c] * scale - row_lse).exp();
                        }
                    }
                    // P^T in `s`, dS^T in `dp`.
                    let mut pr = frag[i];
                    pr[c] = x;
                    frag[i] = pr;
                    let mut gr = g[i];
                    gr[c] = x * (g[i][c] - row_delta);
                    g[i] = gr;
                }
            }
        }
        let mut pa = Sequence::<Frag<E>>::new();
        let mut da = Sequence::<Frag<E>>::new();
        #[unroll]
        for jj in 0..comptime![ROWS / 16] {
            pa.push(a_of_c::<E>(s.index(2 * jj), s.index(2 * jj + 1)));
            da.push(a_of_c::<E>(dp.index(2 * jj), dp.index(2 * jj + 1)));
        }
        // dV += P^T dO, dK += dS^T Q (scaled once at the end): dO and Q by column.
        #[unroll]
        for dp2 in 0..comptime![d / 16] {
            #[unroll]
            for jj in 0..comptime![ROWS / 16] {
                let b_do = b_of_columns::<E, N>(&def, &do_s, at + jj * 16, dp2 * 16, d, width);
                def.execute_inplace(pa.index(jj), &half::<E>(&b_do, 0usize), dv.index_mut(2 * dp2));
                def.execute_inplace(pa.index(jj), &half::<E>(&b_do, 1usize), dv.index_mut(2 * dp2 + 1));
                let b_q = b_of_columns::<E, N>(&def, &q_s, at + jj * 16, dp2 * 16, d, width);
                def.execute_inplace(da.index(jj), &half::<E>(&b_q, 0usize), dk.index_mut(2 * dp2));
                def.execute_inplace(da.index(jj), &half::<E>(&b_q, 1usize), dk.index_mut(2 * dp2 + 1));
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
