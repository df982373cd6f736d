//! Input embedder (Algorithm 3 with relative positions, Algorithm 4) and recycling embedder
//! (Algorithm 32).

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::primitives::{LayerNorm, Linear, LinearInit};
use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Algorithm 3 (+ Algorithm 4 `relpos`): initial MSA and pair embeddings.
#[derive(Debug, Clone)]
pub struct InputEmbedder {
    pub linear_tf_z_i: Linear,
    pub linear_tf_z_j: Linear,
    pub linear_tf_m: Linear,
    pub linear_msa_m: Linear,
    pub linear_relpos: Linear,
    pub relpos_k: usize,
}

impl InputEmbedder {
    pub fn new(
        vb: VarBuilder,
        tf_dim: usize,
        msa_dim: usize,
        c_z: usize,
        c_m: usize,
        relpos_k: usize,
    ) -> Result<Self> {
        use LinearInit::Default as D;
        Ok(Self {
            linear_tf_z_i: Linear::new(vb.pp("linear_tf_z_i"), tf_dim, c_z, true, D)?,
            linear_tf_z_j: Linear::new(vb.pp("linear_tf_z_j"), tf_dim, c_z, true, D)?,
            linear_tf_m: Linear::new(vb.pp("linear_tf_m"), tf_dim, c_m, true, D)?,
            linear_msa_m: Linear::new(vb.pp("linear_msa_m"), msa_dim, c_m, true, D)?,
            linear_relpos: Linear::new(vb.pp("linear_relpos"), 2 * relpos_k + 1, c_z, true, D)?,
            relpos_k,
        })
    }

    pub fn from_config(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        Self::new(vb, cfg.tf_dim, cfg.msa_dim, cfg.c_z, cfg.c_m, cfg.relpos_k)
    }

    /// One-hot of `clip(ri_i - ri_j, -k, k) + k`, `[R, R, 2k+1]` in `dtype` (Algorithm 4).
    pub fn relpos_one_hot(&self, ri: &Tensor, dtype: DType) -> Result<Tensor> {
        // On the device (no host round trip, so the step can be captured in a CUDA graph):
        // residue indices are integers far below 2^24, exact in f32.
        let k = self.relpos_k as f64;
        let nb = 2 * self.relpos_k + 1;
        let dev = self.linear_relpos.weight.device();
        let ri = ri.to_device(dev)?.to_dtype(DType::F32)?;
        let bin = (ri
            .unsqueeze(1)?
            .broadcast_sub(&ri.unsqueeze(0)?)?
            .clamp(-k, k)?
            + k)?; // [R, R]
        let classes = Tensor::arange(0u32, nb as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((1, 1, nb))?;
        Ok(bin.unsqueeze(2)?.broadcast_eq(&classes)?.to_dtype(dtype)?)
    }

    /// `tf` `[R, tf_dim]`, `ri` `[R]` (integer residue index), `msa` `[S, R, msa_dim]` →
    /// `(msa_emb [S, R, c_m], pair_emb [R, R, c_z])`.
    pub fn forward(&self, tf: &Tensor, ri: &Tensor, msa: &Tensor) -> Result<(Tensor, Tensor)> {
        let (r, _) = tf.dims2()?;
        if ri.dims1()? != r {
            return Err(Error::Model(format!(
                "input embedder: residue_index has {} entries, target_feat {r}",
                ri.dims1()?
            )));
        }
        let tf_i = self.linear_tf_z_i.forward(tf)?; // [R, c_z]
        let tf_j = self.linear_tf_z_j.forward(tf)?; // [R, c_z]
        let rel = self
            .linear_relpos
            .forward(&self.relpos_one_hot(ri, tf.dtype())?)?; // [R, R, c_z]
        let pair = rel
            .broadcast_add(&tf_i.unsqueeze(1)?)?
            .broadcast_add(&tf_j.unsqueeze(0)?)?;
        let msa_emb = self
            .linear_msa_m
            .forward(msa)?
            .broadcast_add(&self.linear_tf_m.forward(tf)?.unsqueeze(0)?)?;
        Ok((msa_emb, pair))
    }
}

/// Algorithm 32: embeds the previous cycle's first MSA row, pair and pseudo-β positions.
#[derive(Debug, Clone)]
pub struct RecyclingEmbedder {
    pub layer_norm_m: LayerNorm,
    pub layer_norm_z: LayerNorm,
    pub linear: Linear,
    pub min_bin: f64,
    pub max_bin: f64,
    pub no_bins: usize,
    pub inf: f64,
}

impl RecyclingEmbedder {
    pub fn new(
        vb: VarBuilder,
        c_m: usize,
        c_z: usize,
        min_bin: f64,
        max_bin: f64,
        no_bins: usize,
        inf: f64,
    ) -> Result<Self> {
        Ok(Self {
            layer_norm_m: LayerNorm::new(vb.pp("layer_norm_m"), c_m)?,
            layer_norm_z: LayerNorm::new(vb.pp("layer_norm_z"), c_z)?,
            linear: Linear::new(vb.pp("linear"), no_bins, c_z, true, LinearInit::Default)?,
            min_bin,
            max_bin,
            no_bins,
            inf,
        })
    }

    pub fn from_config(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let r = &cfg.recycling;
        Self::new(vb, cfg.c_m, cfg.c_z, r.min_bin, r.max_bin, r.no_bins, r.inf)
    }

    /// Distance one-hot `[R, R, no_bins]` of the pseudo-β coordinates `x` `[R, 3]`: bins are
    /// `linspace(min, max, n)` in `x`'s dtype, `lower = bins²`, `upper = [bins[1:]², inf]`, strict
    /// inequalities. Piecewise constant: no gradient flows to `x`.
    pub fn distance_one_hot(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let n = self.no_bins;
        let step = if n > 1 {
            (self.max_bin - self.min_bin) / (n - 1) as f64
        } else {
            0.0
        };
        let bins: Vec<f64> = (0..n).map(|i| self.min_bin + step * i as f64).collect();
        let dev = x.device();
        let bins = Tensor::from_vec(bins, n, dev)?.to_dtype(dtype)?;
        let lower = bins.sqr()?;
        let inf = Tensor::from_vec(vec![self.inf], 1, dev)?.to_dtype(dtype)?;
        let upper = Tensor::cat(&[&lower.narrow(0, 1, n - 1)?, &inf], 0)?;
        let x = x.detach();
        let diff = x.unsqueeze(1)?.broadcast_sub(&x.unsqueeze(0)?)?; // [R, R, 3]
        let d2 = diff.sqr()?.sum_keepdim(2)?; // [R, R, 1]
        let above = d2.broadcast_gt(&lower)?.to_dtype(dtype)?;
        let below = d2.broadcast_lt(&upper)?.to_dtype(dtype)?;
        Ok((above * below)?)
    }

    /// `m` `[R, c_m]` (first MSA row of the previous cycle), `z` `[R, R, c_z]`, `x` `[R, 3]` →
    /// `(m_update, z_update)`.
    pub fn forward(&self, m: &Tensor, z: &Tensor, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let m_update = self.layer_norm_m.forward(m)?;
        let z_ln = self.layer_norm_z.forward(z)?;
        let d = self.linear.forward(&self.distance_one_hot(x)?)?;
        Ok((m_update, (d + z_ln)?))
    }
}

/// Extra-MSA embedding (Algorithm 2 line 15, OpenFold `ExtraMSAEmbedder`): the extra-MSA feature
/// `one_hot(extra_msa, 23) | has_deletion | deletion_value` → `linear` → `c_e`.
#[derive(Debug, Clone)]
pub struct ExtraMsaEmbedder {
    pub linear: Linear,
}

impl ExtraMsaEmbedder {
    /// Number of restype classes of the extra-MSA one-hot (20 + X + gap + mask).
    pub const N_CLASSES: usize = 23;

    pub fn new(vb: VarBuilder, c_in: usize, c_e: usize) -> Result<Self> {
        Ok(Self {
            linear: Linear::new(vb.pp("linear"), c_in, c_e, true, LinearInit::Default)?,
        })
    }

    pub fn from_config(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        Self::new(vb, cfg.extra_msa_dim, cfg.c_e)
    }

    /// `[S, R, 25]` feature in `dtype` from `extra_msa` `[S, R]` (integer classes),
    /// `has_deletion` and `deletion_value` `[S, R]`.
    pub fn features(
        extra_msa: &Tensor,
        has_deletion: &Tensor,
        deletion_value: &Tensor,
        dtype: DType,
    ) -> Result<Tensor> {
        let (s, r) = extra_msa.dims2()?;
        let classes: Vec<i64> = extra_msa.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
        let n = Self::N_CLASSES;
        let mut v = vec![0f32; s * r * n];
        for (i, &c) in classes.iter().enumerate() {
            if c < 0 || c as usize >= n {
                return Err(Error::Model(format!("extra_msa class {c} outside 0..{n}")));
            }
            v[i * n + c as usize] = 1.0;
        }
        let dev = has_deletion.device();
        let onehot = Tensor::from_vec(v, (s, r, n), &candle_core::Device::Cpu)?
            .to_device(dev)?
            .to_dtype(dtype)?;
        Ok(Tensor::cat(
            &[
                &onehot,
                &has_deletion.to_dtype(dtype)?.unsqueeze(2)?,
                &deletion_value.to_dtype(dtype)?.unsqueeze(2)?,
            ],
            2,
        )?)
    }

    /// Embed the `[S, R, 25]` feature → `[S, R, c_e]`.
    pub fn forward(&self, feat: &Tensor) -> Result<Tensor> {
        self.linear.forward(feat)
    }
}
