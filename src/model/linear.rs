//! Linear layers as the checkpoint stores them (`[out, in]`, kept transposed), their loading
//! from a weight source, and the joined form of layers that read one input.

use burn::module::{Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Shape, Tensor};
use kernels_cubecl as ops;

use super::weights::{build_time, HostTensor, InitKind, TensorRequest, WeightSource};
use crate::backend::profile::span;
use crate::backend::TrainBackend;
use crate::error::Result;
use crate::lora::LoraAdapter;
use crate::parallel::tensor::TensorParallel;
use crate::parallel::Partition;

/// Builds parameters from a weight source, translating internal paths to checkpoint names.
pub struct Loader<'a, B: Backend> {
    pub source: &'a mut dyn WeightSource,
    pub device: B::Device,
    /// Maps an internal (Hugging Face-shaped) path to the checkpoint's tensor name.
    pub naming: &'a dyn Fn(&str) -> String,
}

impl<B: TrainBackend> Loader<'_, B> {
    fn host(
        &mut self,
        path: &str,
        shape: &[usize],
        slice: Option<(usize, std::ops::Range<usize>)>,
        init: InitKind,
    ) -> Result<HostTensor> {
        let name = (self.naming)(path);
        build_time::timed(0, || self.source.tensor(TensorRequest { name: &name, shape, slice, init }))
    }

    /// Converted to the backend's float type on all cores as it is written for the device
    /// ([`kernels_cubecl::DeviceMemoryBackend::float_from_fill`]: on CUDA straight into pinned
    /// staging buffers).
    pub(super) fn upload<const D: usize>(&self, t: HostTensor) -> Tensor<B, D> {
        let data = &t.data;
        let fill = |offset: usize, dst: &mut [B::FloatElem]| put(dst, data[offset..offset + dst.len()].iter().copied());
        build_time::timed(1, || B::float_from_fill(Shape::from(t.shape.clone()), &self.device, &fill))
    }

    /// `{path}.weight` of each of `paths` (`[out, in]` as stored), transposed and stacked
    /// `[experts, in, out]` in the backend's float type: each piece the source makes is written
    /// straight to its places in the stack on the thread that made it, with no f32 copy of the
    /// experts (for Qwen3-30B-A3B, 2.4 GB a projection a layer, where first touches of fresh
    /// pages cost more than the arithmetic).
    pub(super) fn stacked_transposed(&mut self, paths: &[String], inp: usize, out: usize) -> Result<Tensor<B, 3>> {
        let names: Vec<String> = paths.iter().map(|p| (self.naming)(&super::hf_names::weight(p))).collect();
        let shape = [out, inp];
        let reqs: Vec<TensorRequest<'_>> = names.iter().map(|name| TensorRequest { name, shape: &shape, slice: None, init: InitKind::Normal }).collect();
        let block = inp * out;
        let mut stack = zeroed::<B::FloatElem>(paths.len() * block);
        let places = Places(stack.as_mut_ptr(), stack.len());
        build_time::timed(0, || {
            self.source.fill(&reqs, &|k, offset, values| {
                // Every place below is inside the stack: i < inp and o < out.
                assert!(k < paths.len() && offset + values.len() <= block, "a piece outside expert {k}'s {block} values");
                // Stored (o, i) goes to (k, i, o); `values` runs along stored rows.
                let (mut o, mut i) = (offset / inp, offset % inp);
                for &v in values {
                    // SAFETY: inside expert k's block (checked above), a place no other piece
                    // has (each stored value comes once).
                    unsafe { places.put(k * block + i * out + o, v) };
                    i += 1;
                    if i == inp {
                        (o, i) = (o + 1, 0);
                    }
                }
            })
        })?;
        let fill = |offset: usize, dst: &mut [B::FloatElem]| dst.copy_from_slice(&stack[offset..offset + dst.len()]);
        Ok(build_time::timed(1, || B::float_from_fill(Shape::new([paths.len(), inp, out]), &self.device, &fill)))
    }

    /// A whole (unsharded) tensor as stored, e.g. the token embedding.
    pub fn host_tensor<const D: usize>(&mut self, path: &str, shape: &[usize], init: InitKind) -> Result<Tensor<B, D>> {
        let t = self.host(path, shape, None, init)?;
        Ok(self.upload(t))
    }

    /// Rows `rows` of a whole tensor as stored (`None`: all of them), e.g. this rank's block of
    /// the token embedding under a vocab-parallel layout.
    pub fn host_tensor_rows<const D: usize>(&mut self, path: &str, shape: &[usize], rows: Option<std::ops::Range<usize>>, init: InitKind) -> Result<Tensor<B, D>> {
        let t = self.host(path, shape, rows.map(|r| (0, r)), init)?;
        Ok(self.upload(t))
    }

    /// A 1-D parameter (norm scale, bias).
    pub fn vector(&mut self, path: &str, len: usize, init: InitKind) -> Result<Param<Tensor<B, 1>>> {
        let t = self.host(path, &[len], None, init)?;
        Ok(Param::from_tensor(self.upload(t)))
    }
}

/// `y = x W^T + b` with `W` stored transposed as `[in, out]` so the forward is one matmul, plus
/// a LoRA adapter's `s * (x A) B` when one is attached.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[in_local, out_local]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[out_local]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub lora: Option<LoraAdapter<B>>,
    /// Which slice of the checkpoint's layer this one holds (what LoRA's init and a checkpoint's
    /// gather read).
    #[module(skip)]
    pub partition: Partition,
}

impl<B: TrainBackend> Linear<B> {
    /// Load `{path}.weight` (HF layout `[out, in]`) and optionally `{path}.bias`, keeping the
    /// slice `partition` owns.
    pub fn load(
        ld: &mut Loader<'_, B>,
        path: &str,
        inp: usize,
        out: usize,
        bias: bool,
        partition: Partition,
    ) -> Result<Self> {
        let w = Self::host_weight(ld, path, inp, out, partition)?;
        let weight = Param::from_tensor(ld.upload(transpose(w)));
        let bias = if bias { Some(Self::host_bias(ld, path, out, partition)?) } else { None };
        Ok(Linear { weight, bias: bias.map(|b| Param::from_tensor(ld.upload(b))), lora: None, partition })
    }

    /// `{path}.weight`'s slice that `partition` owns, `[out_local, in_local]` as stored.
    fn host_weight(ld: &mut Loader<'_, B>, path: &str, inp: usize, out: usize, partition: Partition) -> Result<HostTensor> {
        ld.host(&super::hf_names::weight(path), &[out, inp], partition.weight_slice(out, inp), InitKind::Normal)
    }

    /// `{path}.bias`'s slice that `partition` owns.
    fn host_bias(ld: &mut Loader<'_, B>, path: &str, out: usize, partition: Partition) -> Result<HostTensor> {
        ld.host(&super::hf_names::bias(path), &[out], partition.bias_slice(out), InitKind::Zeros)
    }

    /// [`load`](Self::load) of layers that read one input (`parts`: path and width of each),
    /// their weights uploaded side by side as one [`JoinedWeight`], the matrix
    /// [`forward_joined`](Self::forward_joined) multiplies by; each layer's `weight` is a view
    /// of its columns (no second copy where the columns start at the device's alignment, as
    /// they do at these models' widths).
    pub fn load_joined<const N: usize>(
        ld: &mut Loader<'_, B>,
        parts: [(&str, usize); N],
        inp: usize,
        bias: bool,
        partition: Partition,
    ) -> Result<([Self; N], JoinedWeight<B>)> {
        // `[out, in]` row-major each: stacked rows are the concatenated data.
        let (mut data, mut widths) = (Vec::new(), [0; N]);
        for (i, (path, out)) in parts.iter().enumerate() {
            let w = Self::host_weight(ld, path, inp, *out, partition)?;
            widths[i] = w.shape[0];
            data.extend(w.data);
        }
        let total = widths.iter().sum();
        let joined = ld.upload(transpose(HostTensor { shape: vec![total, inp], data }));
        let joined_bias = if bias {
            let mut data = Vec::with_capacity(total);
            for (path, out) in parts {
                data.extend(Self::host_bias(ld, path, out, partition)?.data);
            }
            Some(ld.upload(HostTensor { shape: vec![total], data }))
        } else {
            None
        };
        Ok(JoinedWeight::split(joined, joined_bias, widths, partition))
    }

    /// `(in_local, out_local)`.
    pub fn dims(&self) -> (usize, usize) {
        let [i, o] = self.weight.val().dims();
        (i, o)
    }

    /// # Shapes
    /// - `x`: `[..., in_local]` → `[..., out_local]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.add_bias(self.forward_unbiased(x))
    }

    /// [`forward`](Self::forward) of a row-parallel layer (`tp`: the group its input rows are
    /// split over, `None` on one rank): the ranks' partial products summed as the block leaves
    /// the tensor-parallel region ([`TensorParallel::leave`]), then the bias, once.
    pub fn forward_row_parallel<const D: usize>(&self, x: Tensor<B, D>, tp: Option<&TensorParallel<B::Wire>>) -> Tensor<B, D> {
        match tp {
            Some(tp) => self.add_bias(tp.leave(self.forward_unbiased(x))),
            None => self.forward(x),
        }
    }

    /// `x W` plus the adapter's term, without the bias.
    fn forward_unbiased<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.lora {
            Some(adapter) => adapter.linear(x, self.weight.val()),
            None => B::linear_matmul(x, self.weight.val()),
        }
    }

    fn add_bias<const D: usize>(&self, y: Tensor<B, D>) -> Tensor<B, D> {
        match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        }
    }

    /// Whether `linears` can run as one layer now ([`forward_joined`](Self::forward_joined);
    /// [`LoraAdapter::can_join`]); else the caller runs them apart.
    pub fn joinable(linears: &[&Linear<B>], device: &B::Device) -> bool {
        LoraAdapter::can_join(&linears.iter().map(|l| l.lora.as_ref()).collect::<Vec<_>>(), device)
    }

    /// [`forward`](Self::forward) of layers that read one input (an attention's q, k and v) as
    /// one GEMM over their weights side by side, and one adapter (see [`LoraAdapter::joined`]):
    /// each layer's output in its columns of `[..., sum of outs]`. `joined_weight` is the weights side
    /// by side as [`load_joined`](Self::load_joined) keeps them, used while it backs the
    /// layers' weights ([`JoinedWeight::backing`]); else, or without it, the weights are
    /// concatenated on the call. The layers are [`joinable`](Self::joinable) (the caller asks
    /// first, to run them apart otherwise).
    ///
    /// # Shapes
    /// - `x`: `[..., in]` → `[..., sum of outs]`
    pub fn forward_joined<const D: usize>(linears: &[&Linear<B>], joined_weight: Option<&JoinedWeight<B>>, x: Tensor<B, D>) -> Tensor<B, D> {
        let device = x.device();
        debug_assert!(Self::joinable(linears, &device), "forward_joined: adapters that cannot act as one");
        let parts: Vec<(Option<&LoraAdapter<B>>, usize)> = linears.iter().map(|l| (l.lora.as_ref(), l.dims().1)).collect();
        let total = parts.iter().map(|(_, out)| out).sum();
        // Sub-spans (`--profile` only) to tell the concatenations from the GEMM.
        let joined = span::<B, _>("join_adapters", &device, || LoraAdapter::joined(&parts, &device));
        let backing = joined_weight.and_then(|j| j.backing(linears));
        let (w, joined_bias) = match backing {
            Some((w, bias)) => (w, bias),
            None => (span::<B, _>("join_weights", &device, || Tensor::cat(linears.iter().map(|l| l.weight.val()).collect(), 1)), None),
        };
        let y = span::<B, _>("gemm", &device, || match joined {
            Some(factors) => ops::linear::over_rows(x, total, |x| B::lora_linear(x, w, factors)),
            None => B::linear_matmul(x, w),
        });
        if linears.iter().all(|l| l.bias.is_none()) {
            return y;
        }
        let dtype = y.dtype();
        span::<B, _>("bias", &device, || {
            let bias = joined_bias.unwrap_or_else(|| {
                let parts = linears.iter().map(|l| match &l.bias {
                    Some(b) => b.val(),
                    None => Tensor::zeros([l.dims().1], (&device, dtype)),
                });
                Tensor::cat(parts.collect(), 0)
            });
            y + bias.unsqueeze()
        })
    }

    /// The frozen part of [`forward`](Self::forward) (weight and bias; experts' adapters are
    /// stacked apart, [`ExpertAdapter`](crate::lora::ExpertAdapter)) of one linear layer per
    /// expert at once: `x[e]` through `linears[e]`. `stacked`: their weights as one `[experts, in, out]` tensor where the
    /// layers still hold views of it ([`StackedExperts`](super::experts::StackedExperts));
    /// else the weights are stacked on the call, a copy that lives as long as the graph needs
    /// it for dX.
    ///
    /// # Shapes
    /// - `x`: `[experts, tokens, in]` → `[experts, tokens, out]`
    pub fn forward_stacked(linears: &[&Linear<B>], stacked: Option<Tensor<B, 3>>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let device = x.device();
        let w = stacked.unwrap_or_else(|| Tensor::stack::<3>(linears.iter().map(|l| l.weight.val()).collect(), 0));
        let y = B::batched_matmul(x, w);
        if !linears.iter().any(|l| l.bias.is_some()) {
            return y;
        }
        let [_, out] = linears[0].weight.val().dims();
        let dtype = y.dtype();
        let zeros = || Tensor::zeros([out], (&device, dtype));
        let b = linears.iter().map(|l| l.bias.as_ref().map_or_else(zeros, |b| b.val()));
        y + Tensor::stack::<2>(b.collect(), 0).unsqueeze_dim(1)
    }
}

/// `n` zeros, allocated zeroed: the pages are mapped at their first write, so that the parallel
/// fill that follows touches them on all cores (`vec![x; n]` of a non-integer type writes every
/// page on one core first).
fn zeroed<E: burn::tensor::Element>(n: usize) -> Vec<E> {
    bytemuck::zeroed_vec(n)
}

/// A buffer the threads of a [`WeightSource::fill`](super::weights::WeightSource::fill) write
/// into at once, each place once ([`super::weights::Sink`]'s promise), so never two at one place.
struct Places<E>(*mut E, usize);

// SAFETY: the threads write disjoint places of a buffer that outlives them (the fill returns
// before the buffer is read or moved).
unsafe impl<E: Send> Sync for Places<E> {}

impl<E: burn::tensor::Element> Places<E> {
    /// # Safety
    /// `index` is below the buffer's length, and no other thread writes it.
    unsafe fn put(&self, index: usize, v: f32) {
        use burn::tensor::ElementConversion;
        debug_assert!(index < self.1, "place {index} outside {} values", self.1);
        // SAFETY: the caller's promise.
        unsafe { self.0.add(index).write(v.elem()) }
    }
}

/// `values` converted to `E`, written one after another into `dst`.
fn put<E: burn::tensor::Element>(dst: &mut [E], values: impl Iterator<Item = f32>) {
    use burn::tensor::ElementConversion;
    dst.iter_mut().zip(values).for_each(|(d, v)| *d = v.elem());
}

/// `[rows, cols]` row-major as `[cols, rows]`.
pub(super) fn transpose(t: HostTensor) -> HostTensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let mut data = vec![0.0; t.data.len()];
    // Blocks of output rows on all cores, read in tiles (a 7B model transposes 7e9 values).
    const TILE: usize = 64;
    let blocks: Vec<(usize, &mut [f32])> = data.chunks_mut(TILE * rows.max(1)).enumerate().collect();
    super::weights::parallel_for(blocks, |(b, out)| {
        let c0 = b * TILE;
        let width = out.len() / rows.max(1);
        for r0 in (0..rows).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                let src = &t.data[r * cols + c0..r * cols + c0 + width];
                for (dc, &v) in src.iter().enumerate() {
                    out[dc * rows + r] = v;
                }
            }
        }
    });
    HostTensor { shape: vec![cols, rows], data }
}

/// The frozen weights (and biases) of linear layers that read one input, side by side
/// `[in, sum of outs]` (`[sum of outs]`), as [`Linear::load_joined`] uploads them: each layer's
/// `weight` and `bias` are views of its columns. Plain tensors, not parameters, so that the
/// weights count once (and no mapper or optimizer sees them); the views' parameter ids tell
/// whether the layers still hold them.
#[derive(Module, Debug)]
pub struct JoinedWeight<B: Backend> {
    pub weight: Tensor<B, 2>,
    pub bias: Option<Tensor<B, 1>>,
    /// Each layer's weight and bias parameter ids.
    #[module(skip)]
    pub views: Vec<(ParamId, Option<ParamId>)>,
}

impl<B: Backend> JoinedWeight<B> {
    /// Layers of `widths` output columns each whose weights (and biases) are views of
    /// `weight`'s (`bias`'s) columns, in order, and the joined tensors that back them.
    pub fn split<const N: usize>(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>, widths: [usize; N], partition: Partition) -> ([Linear<B>; N], Self) {
        let mut offset = 0;
        let linears = widths.map(|width| {
            let view = Param::from_tensor(weight.clone().narrow(1, offset, width));
            let bias = bias.as_ref().map(|b| Param::from_tensor(b.clone().narrow(0, offset, width)));
            offset += width;
            Linear { weight: view, bias, lora: None, partition }
        });
        let views = linears.iter().map(view_ids).collect();
        (linears, JoinedWeight { weight, bias, views })
    }

    /// The joined weight and bias when they still back `linears`' own: the same parameters (a
    /// weight replaced, e.g. by merging an adapter into it, is a new parameter) and frozen
    /// (trained ones move away from the load-time values).
    pub fn backing(&self, linears: &[&Linear<B>]) -> Option<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        still_views(&self.views, linears.iter().copied()).then(|| (self.weight.clone(), self.bias.clone()))
    }
}

/// The parameter ids a joined or stacked weight knows a layer's views by: weight and bias.
pub(super) fn view_ids<B: Backend>(l: &Linear<B>) -> (ParamId, Option<ParamId>) {
    (l.weight.id, l.bias.as_ref().map(|b| b.id))
}

/// Whether `linears` are still the views `views` of a weight loaded joined or stacked with them:
/// the same parameters, in order (a weight replaced, e.g. by merging an adapter into it or
/// loading a trained one, is a new parameter) and frozen (trained ones move away from the
/// load-time values). Only the autodiff backend tells frozen from trained: on the inner one
/// (`valid()`) every weight looks frozen, and an optimizer's step keeps the parameter id, so a
/// model that trains drops what no longer backs its weights before it trains
/// ([`CausalLm::without_unbacked_joins`](super::CausalLm::without_unbacked_joins)).
pub(super) fn still_views<'a, B: Backend + 'a>(views: &[(ParamId, Option<ParamId>)], linears: impl IntoIterator<Item = &'a Linear<B>>) -> bool {
    let frozen = |l: &Linear<B>| !l.weight.val().is_require_grad() && l.bias.as_ref().is_none_or(|b| !b.val().is_require_grad());
    let mut seen = 0;
    let all = linears.into_iter().all(|l| {
        seen += 1;
        views.get(seen - 1) == Some(&view_ids(l)) && frozen(l)
    });
    all && seen == views.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ad = burn::backend::Autodiff<crate::backend::Cpu>;

    /// Layers loaded joined hold what they hold loaded apart (a rank's slice under tensor
    /// parallelism included), and the joined weight is theirs side by side.
    #[test]
    fn joined_load_is_the_layers_loaded_apart_side_by_side() {
        let values = |t: Tensor<Ad, 2>| t.into_data().to_vec::<f32>().unwrap();
        for partition in [Partition::Replicated, Partition::Column(crate::parallel::ProcessGroup::new(1, 2))] {
            let mut source = super::super::weights::RandomInit { seed: 5, std: 0.02 };
            let naming = |p: &str| p.to_string();
            let mut ld = Loader::<Ad> { source: &mut source, device: Default::default(), naming: &naming };
            let parts = [("q", 12), ("k", 4), ("v", 4)];
            let apart: Vec<Linear<Ad>> = parts.iter().map(|(p, out)| Linear::load(&mut ld, p, 6, *out, true, partition).unwrap()).collect();
            let (joined, weight) = Linear::load_joined(&mut ld, parts, 6, true, partition).unwrap();
            for (a, j) in apart.iter().zip(&joined) {
                assert_eq!(values(j.weight.val()), values(a.weight.val()), "{partition:?}");
                let bias = |l: &Linear<Ad>| l.bias.as_ref().map(|b| b.val().into_data().to_vec::<f32>().unwrap());
                assert_eq!(bias(j), bias(a));
            }
            let cat = || Tensor::cat(apart.iter().map(|l| l.weight.val()).collect(), 1);
            assert_eq!(values(weight.weight.clone()), values(cat()));
            let biases = Tensor::cat(apart.iter().map(|l| l.bias.as_ref().expect("bias").val()).collect(), 0);
            assert_eq!(weight.bias.clone().map(|b| b.into_data().to_vec::<f32>().unwrap()), Some(biases.into_data().to_vec::<f32>().unwrap()));
            let joined: Vec<&Linear<Ad>> = joined.iter().collect();
            let frozen: Vec<Linear<Ad>> = joined.iter().map(|l| (*l).clone().no_grad()).collect();
            assert!(weight.backing(&frozen.iter().collect::<Vec<_>>()).is_some(), "frozen views are backed");
            assert!(weight.backing(&joined).is_none(), "weights that train are not");
            let mut replaced = frozen.clone();
            replaced[1].weight = Param::from_tensor(replaced[1].weight.val() * 2.0).set_require_grad(false);
            assert!(weight.backing(&replaced.iter().collect::<Vec<_>>()).is_none(), "a replaced weight is not");
        }
    }

    #[test]
    fn transpose_moves_every_value_over_odd_and_tiled_shapes() {
        for (rows, cols) in [(1, 1), (3, 5), (64, 64), (130, 67), (7, 200)] {
            let data: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = transpose(HostTensor { shape: vec![rows, cols], data: data.clone() });
            assert_eq!(t.shape, [cols, rows]);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t.data[c * rows + r], data[r * cols + c], "({r}, {c}) of {rows}x{cols}");
                }
            }
        }
    }
}
