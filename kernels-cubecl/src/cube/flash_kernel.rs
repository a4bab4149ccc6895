//! FlashAttention-2's kernels (Dao, 2023): forward, and a backward in two kernels (keys'
//! and values' gradients per key block, queries' per query block) so that no gradient needs an
//! atomic add. Their own module: CubeCL's `Tensor` would clash with burn's.
//!
//! One cube stages its tiles in shared memory: the query block, the key and value block of the
//! moment, the scores in f32 and the f32 accumulators. Products of two tiles run through
//! [`tile_mma`]: on tensor cores (`cmma`, 16x16x16 fragments, one plane per output fragment at a
//! time) where the runtime has them for the input dtype, otherwise one unit per output element
//! (wgpu in CI, f32 inputs). Everything else (masking, the online softmax, the rescaling of the
//! output) is per row or per element, in f32.
//!
//! Inputs are read through their strides (`q` `[batch, q_heads, seq, d]`, `k`/`v` `[batch,
//! kv_heads, seq, d]`, views of a packed projection included; query head `h` reads key/value
//! head `h / (q_heads / kv_heads)`); the mask `[batch, 1, seq, seq]` (`true` = may not read,
//! any strides: an expanded one too) is read where a tile meets it. Outputs are contiguous.

use cubecl::prelude::*;

/// A finite floor instead of -inf (WGSL has no -inf literal): a masked score. Any readable
/// scaled score is above it.
pub(super) const FLOOR: f32 = crate::attention::EMPTY_ROW_FLOOR;

/// `c (+)= a b` over shared-memory tiles: `a` is `[m, k]` (stored `[k, m]` when
/// `a_transposed`), `b` is `[k, n]` (stored `[n, k]` when `b_transposed`), `c` is `[m, n]` in
/// f32, each row-major with the given row stride. Every unit of the cube calls it; the caller
/// synchronises after.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn tile_mma<E: Float>(
    a: &SharedMemory<E>,
    #[comptime] a_stride: usize,
    #[comptime] a_transposed: bool,
    b: &SharedMemory<E>,
    #[comptime] b_stride: usize,
    #[comptime] b_transposed: bool,
    c: &mut SharedMemory<f32>,
    #[comptime] c_stride: usize,
    #[comptime] m: usize,
    #[comptime] n: usize,
    #[comptime] k: usize,
    #[comptime] accumulate: bool,
    #[comptime] tensor_cores: bool,
) {
    if tensor_cores {
        let tiles_n = comptime![n / 16];
        let tiles = comptime![(m / 16) * (n / 16)];
        let a_layout = comptime![if a_transposed { cmma::MatrixLayout::ColMajor } else { cmma::MatrixLayout::RowMajor }];
        let b_layout = comptime![if b_transposed { cmma::MatrixLayout::ColMajor } else { cmma::MatrixLayout::RowMajor }];
        let planes = CUBE_DIM as usize / PLANE_DIM as usize;
        // One plane per output fragment at a time: the trip count is uniform within a plane.
        let mut t = UNIT_POS as usize / PLANE_DIM as usize;
        while t < tiles {
            let ti = t / tiles_n;
            let tj = t % tiles_n;
            let c_start = ti * 16 * c_stride + tj * 16;
            let acc = cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, 16usize, 16usize, 16usize, cmma::MatrixLayout::Undefined, 0.0);
            if accumulate {
                cmma::load_with_layout(&acc, &c.slice(c_start, c.len()), c_stride as u32, cmma::MatrixLayout::RowMajor);
            }
            #[unroll]
            for kk in 0..comptime![k / 16] {
                let mut a_start = ti * 16 * a_stride + kk * 16;
                if a_transposed {
                    a_start = kk * 16 * a_stride + ti * 16;
                }
                let mut b_start = kk * 16 * b_stride + tj * 16;
                if b_transposed {
                    b_start = tj * 16 * b_stride + kk * 16;
                }
                let fa = cmma::Matrix::<E>::from_slice(cmma::MatrixIdent::A, 16usize, 16usize, 16usize, a_layout, &a.slice(a_start, a.len()), a_stride as u32);
                let fb = cmma::Matrix::<E>::from_slice(cmma::MatrixIdent::B, 16usize, 16usize, 16usize, b_layout, &b.slice(b_start, b.len()), b_stride as u32);
                cmma::execute::<E, E, f32, f32>(&fa, &fb, &acc, &acc);
            }
            cmma::store(&mut c.slice_mut(c_start, c.len()), &acc, c_stride as u32, cmma::MatrixLayout::RowMajor);
            t = t + planes;
        }
    } else {
        let mut idx = UNIT_POS as usize;
        while idx < m * n {
            let i = idx / n;
            let j = idx % n;
            let mut acc = f32::new(0.0);
            if accumulate {
                acc = c[i * c_stride + j];
            }
            for x in 0..comptime![k] {
                let mut ai = i * a_stride + x;
                if a_transposed {
                    ai = x * a_stride + i;
                }
                let mut bi = x * b_stride + j;
                if b_transposed {
                    bi = j * b_stride + x;
                }
                acc = acc + f32::cast_from(a[ai]) * f32::cast_from(b[bi]);
            }
            c[i * c_stride + j] = acc;
            idx = idx + CUBE_DIM as usize;
        }
    }
}

/// Rows `[row0, row0 + rows)` of head `head` of batch `batch` of `src` (`[batch, heads, seq,
/// d]`; with `N > 1` a unit last stride, the other strides multiples of `N`) into `dst` (`[rows,
/// d]`, row stride `stride`), zeros past `seq`: `N` elements a load.
#[cube]
pub(super) fn load_rows<E: Float, N: Size>(
    src: &Tensor<Vector<E, N>>,
    batch: usize,
    head: usize,
    row0: usize,
    dst: &mut SharedMemory<E>,
    #[comptime] rows: usize,
    #[comptime] d: usize,
    #[comptime] stride: usize,
) {
    let width = src.vector_size();
    let per_row = comptime![d / width];
    let mut i = UNIT_POS as usize;
    while i < rows * per_row {
        let r = i / per_row;
        let c = (i % per_row) * width;
        let x = row_vector::<E, N>(src, batch, head, row0 + r, c);
        #[unroll]
        for j in 0..width {
            dst[r * stride + c + j] = x[j];
        }
        i = i + CUBE_DIM as usize;
    }
}

/// Elements `col .. col + N` of row `row` of head `head` of batch `batch` of `src` (as
/// [`load_rows`] reads it) in one load; zeros past `seq`.
#[cube]
pub(super) fn row_vector<E: Float, N: Size>(src: &Tensor<Vector<E, N>>, batch: usize, head: usize, row: usize, col: usize) -> Vector<E, N> {
    let width = src.vector_size();
    let mut x = Vector::<E, N>::empty();
    if row < src.shape(2) {
        x = src[(batch * src.stride(0) + head * src.stride(1) + row * src.stride(2) + col * src.stride(3)) / width];
    } else {
        #[unroll]
        for j in 0..width {
            x[j] = E::new(0.0);
        }
    }
    x
}

/// Rows `[row0, row0 + rows)` of head `head` of batch `batch` of a per-row f32 tensor
/// (`[batch, heads, seq]`, any strides) into `dst`, zeros past `seq`.
#[cube]
pub(super) fn load_row_values(src: &Tensor<f32>, batch: usize, head: usize, row0: usize, dst: &mut SharedMemory<f32>, #[comptime] rows: usize) {
    let mut r = UNIT_POS as usize;
    while r < rows {
        dst[r] = row_value(src, batch, head, row0 + r);
        r = r + CUBE_DIM as usize;
    }
}

/// Row `row` of head `head` of batch `batch` of a per-row f32 tensor (`[batch, heads, seq]`, any
/// strides); 0 past `seq`.
#[cube]
pub(super) fn row_value(src: &Tensor<f32>, batch: usize, head: usize, row: usize) -> f32 {
    let mut x = f32::new(0.0);
    if row < src.shape(2) {
        x = src[batch * src.stride(0) + head * src.stride(1) + row * src.stride(2)];
    }
    x
}

/// Rows `[row0, row0 + rows)` of batch `batch` of the [`mask_rows`] table into `dst` (`[rows,
/// 3]`).
#[cube]
pub(super) fn load_row_keys(keys: &Tensor<i32>, batch: usize, row0: usize, seq: usize, dst: &mut SharedMemory<i32>, #[comptime] rows: usize) {
    let mut r = UNIT_POS as usize;
    while r < rows {
        let row = row_keys(keys, batch, row0 + r, seq);
        dst[r * 3] = row.first;
        dst[r * 3 + 1] = row.last;
        let mut interval = i32::new(0);
        if row.interval {
            interval = 1;
        }
        dst[r * 3 + 2] = interval;
        r = r + CUBE_DIM as usize;
    }
}

/// Whether query `qpos` may read key `kpos` (both may lie past `seq`, then not): from the row's
/// interval of readable keys where the row's readable keys are one interval ([`mask_rows`]),
/// from the mask otherwise.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn readable<M: Int>(
    mask: &Tensor<M>,
    strides: MaskStrides,
    row: RowKeys,
    qpos: usize,
    kpos: usize,
    seq: usize,
    #[comptime] causal: bool,
) -> bool {
    let mut ok = qpos < seq && kpos < seq;
    if causal {
        ok = ok && kpos <= qpos;
    }
    if ok {
        if row.interval {
            ok = i32::cast_from(kpos) >= row.first && i32::cast_from(kpos) <= row.last;
        } else {
            ok = mask[strides.batch + qpos * strides.query + kpos * strides.key] == M::new(0);
        }
    }
    ok
}

/// Whether query `qpos` may read every key of `[k0, k0 + keys)`: then a tile's scores need no
/// mask (the blocks inside a causal triangle or a packed segment).
#[cube]
pub(super) fn reads_block(row: RowKeys, qpos: usize, k0: usize, #[comptime] keys: usize, seq: usize, #[comptime] causal: bool) -> bool {
    let last = k0 + keys - 1;
    let mut all = qpos < seq && last < seq && row.interval;
    if causal {
        all = all && last <= qpos;
    }
    all && i32::cast_from(k0) >= row.first && i32::cast_from(last) <= row.last
}

/// A query row's readable keys as [`mask_rows`] found them: `first..=last` when `interval`.
#[derive(CubeType, Clone, Copy)]
pub(super) struct RowKeys {
    first: i32,
    last: i32,
    interval: bool,
}

/// Row `r` of a block's [`load_row_keys`] table `keys_s`.
#[cube]
pub(super) fn shared_row_keys(keys_s: &SharedMemory<i32>, r: usize) -> RowKeys {
    RowKeys { first: keys_s[r * 3], last: keys_s[r * 3 + 1], interval: keys_s[r * 3 + 2] != 0 }
}

/// The first key `row` may read (`seq` when it reads none; 0 when its keys are not one interval,
/// so a caller walks them all).
#[cube]
pub(super) fn row_first_key(row: RowKeys, seq: usize) -> usize {
    let mut first = 0usize;
    if row.interval {
        first = seq;
        if row.first <= row.last {
            first = usize::cast_from(row.first);
        }
    }
    first
}

/// One past the last key `row` may read (0 when it reads none; `seq` when its keys are not one
/// interval).
#[cube]
pub(super) fn row_end_key(row: RowKeys, seq: usize) -> usize {
    let mut end = seq;
    if row.interval {
        end = 0;
        if row.first <= row.last {
            end = usize::cast_from(row.last) + 1;
        }
    }
    end
}

/// Row `qpos` of batch `batch` of the [`mask_rows`] table `keys` (`[batch, seq, 3]`); past `seq`,
/// an empty interval.
#[cube]
pub(super) fn row_keys(keys: &Tensor<i32>, batch: usize, qpos: usize, seq: usize) -> RowKeys {
    let mut first = i32::new(1);
    let mut last = i32::new(0);
    let mut interval = qpos >= seq;
    if qpos < seq {
        let at = (batch * seq + qpos) * 3;
        first = keys[at];
        last = keys[at + 1];
        interval = keys[at + 2] != 0;
    }
    RowKeys { first, last, interval }
}

/// One cube per query row of the mask (`[batch, 1, seq, seq]`, any strides; cube `(x, y)`: row
/// `x` of batch `y`): the row's first and last readable key and whether every key between them
/// is readable, into `keys[(batch * seq + row) * 3 ..][..3]` (a row that reads nothing: `seq, -1,
/// 1`). Causal masks, packed segments and padding give one interval a row, so the attention
/// kernels test two bounds instead of reading the mask. `units` a power of two, the cube's size.
#[cube(launch_unchecked)]
pub(super) fn mask_rows<M: Int>(mask: &Tensor<M>, keys: &mut Tensor<i32>, #[comptime] units: usize, #[define(M)] _dtype: StorageType) {
    let seq = mask.shape(2);
    let row = CUBE_POS_X as usize;
    let batch = CUBE_POS_Y as usize;
    let base = batch * mask.stride(0) + row * mask.stride(2);
    let step = mask.stride(3);
    let unit = UNIT_POS as usize;
    let mut first = i32::cast_from(seq);
    let mut last = i32::new(-1);
    let mut count = i32::new(0);
    let mut j = unit;
    while j < seq {
        if mask[base + j * step] == M::new(0) {
            if i32::cast_from(j) < first {
                first = i32::cast_from(j);
            }
            last = i32::cast_from(j);
            count = count + 1;
        }
        j = j + units;
    }
    let mut firsts = SharedMemory::<i32>::new(units);
    let mut lasts = SharedMemory::<i32>::new(units);
    let mut counts = SharedMemory::<i32>::new(units);
    firsts[unit] = first;
    lasts[unit] = last;
    counts[unit] = count;
    sync_cube();
    let mut half = (CUBE_DIM_X / 2) as usize;
    while half > 0 {
        if unit < half {
            if firsts[unit + half] < firsts[unit] {
                firsts[unit] = firsts[unit + half];
            }
            if lasts[unit + half] > lasts[unit] {
                lasts[unit] = lasts[unit + half];
            }
            counts[unit] = counts[unit] + counts[unit + half];
        }
        sync_cube();
        half = half / 2;
    }
    if unit == 0 {
        let at = (batch * seq + row) * 3;
        keys[at] = firsts[0];
        keys[at + 1] = lasts[0];
        let mut interval = i32::new(0);
        if counts[0] == 0 || counts[0] == lasts[0] - firsts[0] + 1 {
            interval = 1;
        }
        keys[at + 2] = interval;
    }
}

/// The mask's offset of the cube's batch and its query and key strides, read once.
#[derive(CubeType, Clone, Copy)]
pub(super) struct MaskStrides {
    batch: usize,
    query: usize,
    key: usize,
}

#[cube]
pub(super) fn mask_strides<M: Int>(mask: &Tensor<M>, batch: usize) -> MaskStrides {
    MaskStrides { batch: batch * mask.stride(0), query: mask.stride(2), key: mask.stride(3) }
}

/// One cube per block of `br` query rows of one (batch, query head): the output `out`
/// (`[batch, q_heads, seq, d]`, contiguous, `q`'s dtype) and each row's log-sum-exp of its
/// scaled, masked scores `lse` (`[batch, q_heads, seq]`, f32, contiguous; `inf` for a row that
/// reads no key, whose output is 0). Cube `(x, y)`: query block `x`, `y = batch * q_heads +
/// head`. `units` units, `units / br` of them per row in the softmax; with `causal` the key
/// blocks after the query block's last row are skipped.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(super) fn flash_forward<E: Float, M: Int, N: Size>(
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
    #[comptime] br: usize,
    #[comptime] bc: usize,
    #[comptime] units: usize,
    #[comptime] causal: bool,
    #[comptime] tensor_cores: bool,
    #[define(E, M)] _dtypes: [StorageType; 2],
) {
    let seq = q.shape(2);
    // Padded row strides of the shared tiles (input dtype: +8 elements, f32: +4): rows start on
    // different banks, and cmma's loads and stores keep their 16-byte multiples.
    let ld_e = comptime![d + 8];
    let ld_f = comptime![d + 4];
    let ls_f = comptime![bc + 4];
    let ls_e = comptime![bc + 8];
    let q_heads = q.shape(1);
    let groups = q_heads / k.shape(1);
    let bh = CUBE_POS_Y as usize;
    let batch = bh / q_heads;
    let head = bh % q_heads;
    let strides = mask_strides::<M>(mask, batch);
    let q0 = CUBE_POS_X as usize * br;
    let unit = UNIT_POS as usize;
    let per_row = comptime![units / br];
    let row = unit / per_row;
    let part = unit % per_row;
    let qpos = q0 + row;
    let row_keys_q = row_keys(keys, batch, qpos, seq);

    let mut q_s = SharedMemory::<E>::new_aligned(br * (d + 8), 128usize);
    let mut k_s = SharedMemory::<E>::new_aligned(bc * (d + 8), 128usize);
    let mut v_s = SharedMemory::<E>::new_aligned(bc * (d + 8), 128usize);
    let mut s_s = SharedMemory::<f32>::new_aligned(br * (bc + 4), 128usize);
    let mut p_s = SharedMemory::<E>::new_aligned(br * (bc + 8), 128usize);
    let mut o_s = SharedMemory::<f32>::new_aligned(br * (d + 4), 128usize);
    let mut m_s = SharedMemory::<f32>::new(br);
    let mut l_s = SharedMemory::<f32>::new(br);
    let mut max_s = SharedMemory::<f32>::new(units);
    let mut sum_s = SharedMemory::<f32>::new(units);

    load_rows::<E, N>(q, batch, head, q0, &mut q_s, br, d, ld_e);
    let mut i = unit;
    while i < br * (d + 4) {
        o_s[i] = 0.0;
        i = i + units;
    }
    if part == 0 {
        m_s[row] = FLOOR;
        l_s[row] = 0.0;
    }
    sync_cube();

    let mut kv_end = seq;
    if causal {
        if q0 + br < seq {
            kv_end = q0 + br;
        }
    }
    let blocks = (kv_end + bc - 1) / bc;
    let kv_head = head / groups;
    for blk in 0..blocks {
        let k0 = blk * bc;
        load_rows::<E, N>(k, batch, kv_head, k0, &mut k_s, bc, d, ld_e);
        load_rows::<E, N>(v, batch, kv_head, k0, &mut v_s, bc, d, ld_e);
        sync_cube();
        tile_mma::<E>(&q_s, ld_e, false, &k_s, ld_e, true, &mut s_s, ls_f, br, bc, d, false, tensor_cores);
        sync_cube();

        // The row's scaled, masked scores and their max, `per_row` units a row.
        let m_old = m_s[row];
        let mut block_max = f32::new(FLOOR);
        let mut c = part;
        while c < bc {
            let mut x = f32::new(FLOOR);
            if readable::<M>(mask, strides, row_keys_q, qpos, k0 + c, seq, causal) {
                x = s_s[row * (bc + 4) + c] * scale;
            }
            s_s[row * (bc + 4) + c] = x;
            block_max = f32::max(block_max, x);
            c = c + per_row;
        }
        max_s[unit] = block_max;
        sync_cube();
        let mut m_new = m_old;
        #[unroll]
        for j in 0..comptime![per_row] {
            m_new = f32::max(m_new, max_s[row * per_row + j]);
        }
        let mut sum = f32::new(0.0);
        let mut c = part;
        while c < bc {
            let x = s_s[row * (bc + 4) + c];
            let mut p = f32::new(0.0);
            if x > FLOOR {
                p = (x - m_new).exp();
            }
            p_s[row * (bc + 8) + c] = E::cast_from(p);
            sum = sum + p;
            c = c + per_row;
        }
        sum_s[unit] = sum;
        // m_new >= m_old: alpha in [0, 1] (1 while the row has read nothing).
        let alpha = (m_old - m_new).exp();
        let mut c = part;
        while c < d {
            o_s[row * (d + 4) + c] = o_s[row * (d + 4) + c] * alpha;
            c = c + per_row;
        }
        sync_cube();
        if part == 0 {
            let mut total = f32::new(0.0);
            #[unroll]
            for j in 0..comptime![per_row] {
                total = total + sum_s[row * per_row + j];
            }
            l_s[row] = l_s[row] * alpha + total;
            m_s[row] = m_new;
        }
        tile_mma::<E>(&p_s, ls_e, false, &v_s, ld_e, false, &mut o_s, ld_f, br, d, bc, true, tensor_cores);
        sync_cube();
    }

    let out_base = bh * seq * d;
    let mut i = unit;
    while i < br * d {
        let r = i / d;
        if q0 + r < seq {
            let l = l_s[r];
            let mut o = f32::new(0.0);
            if l > 0.0 {
                o = o_s[r * (d + 4) + i % d] / l;
            }
            out[out_base + (q0 + r) * d + i % d] = E::cast_from(o);
        }
        i = i + units;
    }
    if part == 0 && qpos < seq {
        let l = l_s[row];
        let mut value = inf;
        if l > 0.0 {
            value = m_s[row] + l.ln();
        }
        lse[bh * seq + qpos] = value;
    }
}

/// `P = exp(S * scale - L)` and `dS = P (dP - delta)` of a `[br, bc]` tile (queries from `q0`,
/// keys from `k0`; masked entries 0), each in `E` for the next products.
#[cube]
#[allow(clippy::too_many_arguments)]
fn probs_and_grad<E: Float, M: Int>(
    mask: &Tensor<M>,
    strides: MaskStrides,
    q0: usize,
    k0: usize,
    seq: usize,
    scale: f32,
    s_s: &SharedMemory<f32>,
    dp_s: &SharedMemory<f32>,
    lse_s: &SharedMemory<f32>,
    delta_s: &SharedMemory<f32>,
    keys_s: &SharedMemory<i32>,
    p_e: &mut SharedMemory<E>,
    ds_e: &mut SharedMemory<E>,
    #[comptime] br: usize,
    #[comptime] bc: usize,
    #[comptime] causal: bool,
    #[comptime] write_probs: bool,
) {
    let mut i = UNIT_POS as usize;
    while i < br * bc {
        let r = i / bc;
        let mut p = f32::new(0.0);
        let c = i % bc;
        let row = shared_row_keys(keys_s, r);
        if readable::<M>(mask, strides, row, q0 + r, k0 + c, seq, causal) {
            p = (s_s[r * (bc + 4) + c] * scale - lse_s[r]).exp();
        }
        if write_probs {
            p_e[r * (bc + 8) + c] = E::cast_from(p);
        }
        ds_e[r * (bc + 8) + c] = E::cast_from(p * (dp_s[r * (bc + 4) + c] - delta_s[r]));
        i = i + CUBE_DIM as usize;
    }
}

/// One cube per block of `bc` keys of one (batch, kv head): the keys' and values' gradients
/// `d_k`, `d_v` (`[batch, kv_heads, seq, d]`, contiguous) summed over the head's query heads
/// and every query block that reads the keys. `lse` and `delta = rowsum(dO O)` are per query
/// row (`[batch, q_heads, seq]`, f32, any strides). Cube `(x, y)`: key block `x`, `y = batch *
/// kv_heads + kv_head`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(super) fn flash_backward_kv<E: Float, M: Int, N: Size>(
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
    #[comptime] br: usize,
    #[comptime] bc: usize,
    #[comptime] causal: bool,
    #[comptime] tensor_cores: bool,
    #[define(E, M)] _dtypes: [StorageType; 2],
) {
    let seq = q.shape(2);
    // Padded row strides of the shared tiles (input dtype: +8 elements, f32: +4): rows start on
    // different banks, and cmma's loads and stores keep their 16-byte multiples.
    let ld_e = comptime![d + 8];
    let ld_f = comptime![d + 4];
    let ls_f = comptime![bc + 4];
    let ls_e = comptime![bc + 8];
    let kv_heads = k.shape(1);
    let groups = q.shape(1) / kv_heads;
    let bh = CUBE_POS_Y as usize;
    let batch = bh / kv_heads;
    let kv_head = bh % kv_heads;
    let strides = mask_strides::<M>(mask, batch);
    let k0 = CUBE_POS_X as usize * bc;

    let mut k_s = SharedMemory::<E>::new_aligned(bc * (d + 8), 128usize);
    let mut v_s = SharedMemory::<E>::new_aligned(bc * (d + 8), 128usize);
    let mut q_s = SharedMemory::<E>::new_aligned(br * (d + 8), 128usize);
    let mut do_s = SharedMemory::<E>::new_aligned(br * (d + 8), 128usize);
    let mut s_s = SharedMemory::<f32>::new_aligned(br * (bc + 4), 128usize);
    let mut dp_s = SharedMemory::<f32>::new_aligned(br * (bc + 4), 128usize);
    let mut p_e = SharedMemory::<E>::new_aligned(br * (bc + 8), 128usize);
    let mut ds_e = SharedMemory::<E>::new_aligned(br * (bc + 8), 128usize);
    let mut dk_s = SharedMemory::<f32>::new_aligned(bc * (d + 4), 128usize);
    let mut dv_s = SharedMemory::<f32>::new_aligned(bc * (d + 4), 128usize);
    let mut lse_s = SharedMemory::<f32>::new(br);
    let mut delta_s = SharedMemory::<f32>::new(br);
    let mut keys_s = SharedMemory::<i32>::new(br * 3);

    load_rows::<E, N>(k, batch, kv_head, k0, &mut k_s, bc, d, ld_e);
    load_rows::<E, N>(v, batch, kv_head, k0, &mut v_s, bc, d, ld_e);
    let mut i = UNIT_POS as usize;
    while i < bc * (d + 4) {
        dk_s[i] = 0.0;
        dv_s[i] = 0.0;
        i = i + CUBE_DIM as usize;
    }

    // Query blocks that read a key of this block: with causal, those ending after its first key.
    let mut first = 0;
    if causal {
        first = k0 / br;
    }
    let q_blocks = (seq + br - 1) / br;
    for g in 0..groups {
        let head = kv_head * groups + g;
        for qb in first..q_blocks {
            let q0 = qb * br;
            // (The previous round's products are done: it ended on a sync.)
            load_rows::<E, N>(q, batch, head, q0, &mut q_s, br, d, ld_e);
            load_rows::<E, N>(d_out, batch, head, q0, &mut do_s, br, d, ld_e);
            load_row_values(lse, batch, head, q0, &mut lse_s, br);
            load_row_values(delta, batch, head, q0, &mut delta_s, br);
            load_row_keys(keys, batch, q0, seq, &mut keys_s, br);
            sync_cube();
            tile_mma::<E>(&q_s, ld_e, false, &k_s, ld_e, true, &mut s_s, ls_f, br, bc, d, false, tensor_cores);
            tile_mma::<E>(&do_s, ld_e, false, &v_s, ld_e, true, &mut dp_s, ls_f, br, bc, d, false, tensor_cores);
            sync_cube();
            probs_and_grad::<E, M>(mask, strides, q0, k0, seq, scale, &s_s, &dp_s, &lse_s, &delta_s, &keys_s, &mut p_e, &mut ds_e, br, bc, causal, true);
            sync_cube();
            // dV += P^T dO, dK += dS^T Q (scaled once at the end).
            tile_mma::<E>(&p_e, ls_e, true, &do_s, ld_e, false, &mut dv_s, ld_f, bc, d, br, true, tensor_cores);
            tile_mma::<E>(&ds_e, ls_e, true, &q_s, ld_e, false, &mut dk_s, ld_f, bc, d, br, true, tensor_cores);
            sync_cube();
        }
    }

    let base = bh * seq * d;
    let mut i = UNIT_POS as usize;
    while i < bc * d {
        let r = k0 + i / d;
        if r < seq {
            let at = (i / d) * (d + 4) + i % d;
            d_k[base + r * d + i % d] = E::cast_from(dk_s[at] * scale);
            d_v[base + r * d + i % d] = E::cast_from(dv_s[at]);
        }
        i = i + CUBE_DIM as usize;
    }
}

/// One cube per block of `br` query rows of one (batch, query head): the queries' gradient
/// `d_q` (`[batch, q_heads, seq, d]`, contiguous) over every key block the rows read. Cube
/// `(x, y)`: query block `x`, `y = batch * q_heads + head`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(super) fn flash_backward_q<E: Float, M: Int, N: Size>(
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
    #[comptime] br: usize,
    #[comptime] bc: usize,
    #[comptime] causal: bool,
    #[comptime] tensor_cores: bool,
    #[define(E, M)] _dtypes: [StorageType; 2],
) {
    let seq = q.shape(2);
    // Padded row strides of the shared tiles (input dtype: +8 elements, f32: +4): rows start on
    // different banks, and cmma's loads and stores keep their 16-byte multiples.
    let ld_e = comptime![d + 8];
    let ld_f = comptime![d + 4];
    let ls_f = comptime![bc + 4];
    let ls_e = comptime![bc + 8];
    let q_heads = q.shape(1);
    let groups = q_heads / k.shape(1);
    let bh = CUBE_POS_Y as usize;
    let batch = bh / q_heads;
    let head = bh % q_heads;
    let strides = mask_strides::<M>(mask, batch);
    let kv_head = head / groups;
    let q0 = CUBE_POS_X as usize * br;

    let mut q_s = SharedMemory::<E>::new_aligned(br * (d + 8), 128usize);
    let mut do_s = SharedMemory::<E>::new_aligned(br * (d + 8), 128usize);
    let mut k_s = SharedMemory::<E>::new_aligned(bc * (d + 8), 128usize);
    let mut v_s = SharedMemory::<E>::new_aligned(bc * (d + 8), 128usize);
    let mut s_s = SharedMemory::<f32>::new_aligned(br * (bc + 4), 128usize);
    let mut dp_s = SharedMemory::<f32>::new_aligned(br * (bc + 4), 128usize);
    let mut ds_e = SharedMemory::<E>::new_aligned(br * (bc + 8), 128usize);
    let mut dq_s = SharedMemory::<f32>::new_aligned(br * (d + 4), 128usize);
    // (The probabilities' tile, which this kernel does not write.)
    let mut unused = SharedMemory::<E>::new(1usize);
    let mut lse_s = SharedMemory::<f32>::new(br);
    let mut delta_s = SharedMemory::<f32>::new(br);
    let mut keys_s = SharedMemory::<i32>::new(br * 3);

    load_rows::<E, N>(q, batch, head, q0, &mut q_s, br, d, ld_e);
    load_rows::<E, N>(d_out, batch, head, q0, &mut do_s, br, d, ld_e);
    load_row_values(lse, batch, head, q0, &mut lse_s, br);
    load_row_values(delta, batch, head, q0, &mut delta_s, br);
    load_row_keys(keys, batch, q0, seq, &mut keys_s, br);
    let mut i = UNIT_POS as usize;
    while i < br * (d + 4) {
        dq_s[i] = 0.0;
        i = i + CUBE_DIM as usize;
    }

    let mut kv_end = seq;
    if causal {
        if q0 + br < seq {
            kv_end = q0 + br;
        }
    }
    let blocks = (kv_end + bc - 1) / bc;
    for blk in 0..blocks {
        let k0 = blk * bc;
        load_rows::<E, N>(k, batch, kv_head, k0, &mut k_s, bc, d, ld_e);
        load_rows::<E, N>(v, batch, kv_head, k0, &mut v_s, bc, d, ld_e);
        sync_cube();
        tile_mma::<E>(&q_s, ld_e, false, &k_s, ld_e, true, &mut s_s, ls_f, br, bc, d, false, tensor_cores);
        tile_mma::<E>(&do_s, ld_e, false, &v_s, ld_e, true, &mut dp_s, ls_f, br, bc, d, false, tensor_cores);
        sync_cube();
        probs_and_grad::<E, M>(mask, strides, q0, k0, seq, scale, &s_s, &dp_s, &lse_s, &delta_s, &keys_s, &mut unused, &mut ds_e, br, bc, causal, false);
        sync_cube();
        tile_mma::<E>(&ds_e, ls_e, false, &k_s, ld_e, false, &mut dq_s, ld_f, br, d, bc, true, tensor_cores);
        sync_cube();
    }

    let base = bh * seq * d;
    let mut i = UNIT_POS as usize;
    while i < br * d {
        let r = q0 + i / d;
        if r < seq {
            d_q[base + r * d + i % d] = E::cast_from(dq_s[(i / d) * (d + 4) + i % d] * scale);
        }
        i = i + CUBE_DIM as usize;
    }
}
