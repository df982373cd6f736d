//! Invariant point attention (AF2 supplement Algorithm 22), monomer version.
//!
//! Parameter names are OpenFold's `InvariantPointAttention` state-dict names: `linear_q`,
//! `linear_kv`, `linear_q_points.linear`, `linear_kv_points.linear`, `linear_b`, `head_weights`,
//! `linear_out`. All linears have a bias.

use candle_core::{Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::config::StructureConfig;
use crate::error::{Error, Result};
use crate::geometry::rigid::Rigid;
use crate::model::primitives::{cast, softmax, Linear, LinearInit};

/// Sizes of one IPA module (OpenFold constructor arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct IpaConfig {
    pub c_s: usize,
    pub c_z: usize,
    /// Per-head hidden size (`c_ipa`).
    pub c_hidden: usize,
    pub no_heads: usize,
    pub no_qk_points: usize,
    pub no_v_points: usize,
    /// Mask bias magnitude (1e5 in the structure module).
    pub inf: f64,
    /// Added under the square root of the output point norms (1e-8).
    pub eps: f64,
}

impl IpaConfig {
    /// The IPA of a structure module with single size `c_s` and pair size `c_z`.
    pub fn from_structure(cfg: &StructureConfig, c_s: usize, c_z: usize) -> Self {
        Self {
            c_s,
            c_z,
            c_hidden: cfg.c_ipa,
            no_heads: cfg.no_heads_ipa,
            no_qk_points: cfg.no_qk_points,
            no_v_points: cfg.no_v_points,
            inf: cfg.inf,
            eps: cfg.epsilon,
        }
    }

    /// Width of the concatenated output before `linear_out`.
    pub fn concat_dim(&self) -> usize {
        self.no_heads * (self.c_z + self.c_hidden + self.no_v_points * 4)
    }
}

/// `args[key]` as an integer (OpenFold `constructor_args` JSON).
pub(crate) fn arg_usize(args: &serde_json::Value, key: &str) -> Result<usize> {
    args[key]
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| Error::Model(format!("constructor arg `{key}` missing or not an integer")))
}

/// `args[key]` as a number (OpenFold `constructor_args` JSON).
pub(crate) fn arg_f64(args: &serde_json::Value, key: &str) -> Result<f64> {
    args[key]
        .as_f64()
        .ok_or_else(|| Error::Model(format!("constructor arg `{key}` missing or not a number")))
}

impl IpaConfig {
    /// From OpenFold `InvariantPointAttention` constructor arguments (JSON object).
    pub fn from_constructor_args(args: &serde_json::Value) -> Result<Self> {
        Ok(Self {
            c_s: arg_usize(args, "c_s")?,
            c_z: arg_usize(args, "c_z")?,
            c_hidden: arg_usize(args, "c_hidden")?,
            no_heads: arg_usize(args, "no_heads")?,
            no_qk_points: arg_usize(args, "no_qk_points")?,
            no_v_points: arg_usize(args, "no_v_points")?,
            inf: arg_f64(args, "inf")?,
            eps: arg_f64(args, "eps")?,
        })
    }
}

/// `softplus⁻¹(1)`: OpenFold initialises `head_weights` so that `softplus(w) = 1`.
const SOFTPLUS_INV_ONE: f64 = 0.541_324_854_612_918_1;

/// Algorithm 22: invariant point attention.
#[derive(Debug, Clone)]
pub struct InvariantPointAttention {
    pub cfg: IpaConfig,
    pub linear_q: Linear,
    pub linear_kv: Linear,
    pub linear_q_points: Linear,
    pub linear_kv_points: Linear,
    pub linear_b: Linear,
    /// `[no_heads]`, passed through softplus (γ^h in Algorithm 22).
    pub head_weights: Tensor,
    pub linear_out: Linear,
}

impl InvariantPointAttention {
    pub fn new(vb: VarBuilder, cfg: &IpaConfig) -> Result<Self> {
        let (h, c) = (cfg.no_heads, cfg.c_hidden);
        let hc = h * c;
        let lin = |name: &str, c_in: usize, c_out: usize, init: LinearInit| {
            Linear::new(vb.pp(name), c_in, c_out, true, init)
        };
        Ok(Self {
            cfg: cfg.clone(),
            linear_q: lin("linear_q", cfg.c_s, hc, LinearInit::Default)?,
            linear_kv: lin("linear_kv", cfg.c_s, 2 * hc, LinearInit::Default)?,
            linear_q_points: lin(
                "linear_q_points.linear",
                cfg.c_s,
                h * cfg.no_qk_points * 3,
                LinearInit::Default,
            )?,
            linear_kv_points: lin(
                "linear_kv_points.linear",
                cfg.c_s,
                h * (cfg.no_qk_points + cfg.no_v_points) * 3,
                LinearInit::Default,
            )?,
            linear_b: lin("linear_b", cfg.c_z, h, LinearInit::Default)?,
            head_weights: vb.get_with_hints(h, "head_weights", Init::Const(SOFTPLUS_INV_ONE))?,
            linear_out: lin("linear_out", cfg.concat_dim(), cfg.c_s, LinearInit::Final)?,
        })
    }

    /// Local points from `s` `[B, N, c_s]` → global points `[B, N, H, P, 3]`.
    ///
    /// The projection's output is three contiguous blocks (x | y | z) of `H·P` entries each,
    /// indexed `h·P + p` (OpenFold `PointProjection`).
    fn points(&self, lin: &Linear, s: &Tensor, r: &Rigid, p: usize) -> Result<Tensor> {
        let (b, n, _) = s.dims3()?;
        let h = self.cfg.no_heads;
        let local = lin.forward(s)?; // [B, N, 3·H·P]
        let local = local.reshape((b, n, 3, h * p))?.transpose(2, 3)?; // [B, N, H·P, 3]
        let local = local.reshape((b, n, h, p, 3))?;
        // r: [B, N] -> [B, N, 1, 1]
        r.unsqueeze(2)?.unsqueeze(3)?.apply(&local)
    }

    /// `s` `[*, N, c_s]`, `z` `[*, N, N, c_z]`, `r` frames with batch shape `[*, N]`, `mask` `[*, N]`
    /// → `[*, N, c_s]`.
    pub fn forward(&self, s: &Tensor, z: &Tensor, r: &Rigid, mask: &Tensor) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (h, c, pq, pv) = (
            cfg.no_heads,
            cfg.c_hidden,
            cfg.no_qk_points,
            cfg.no_v_points,
        );
        let dims = s.dims().to_vec();
        if dims.len() < 2 {
            return Err(Error::Model(format!(
                "IPA: s must be [*, N, c_s], got {dims:?}"
            )));
        }
        let n = dims[dims.len() - 2];
        let lead = &dims[..dims.len() - 2];
        let b: usize = lead.iter().product();
        let dt = s.dtype();
        // Flatten the batch dims to one: B.
        let s = s.reshape((b, n, cfg.c_s))?;
        let z = z.reshape((b, n, n, cfg.c_z))?;
        let mask = cast(&mask.reshape((b, n))?, dt)?;
        let r = Rigid::new(
            cast(&r.rots.reshape((b, n, 3, 3))?, dt)?,
            cast(&r.trans.reshape((b, n, 3))?, dt)?,
        )?;

        // Scalar queries/keys/values: [B, N, H, C].
        let q = self.linear_q.forward(&s)?.reshape((b, n, h, c))?;
        let kv = self.linear_kv.forward(&s)?.reshape((b, n, h, 2 * c))?;
        let k = kv.narrow(3, 0, c)?;
        let v = kv.narrow(3, c, c)?;

        // Points in the global frame: [B, N, H, P, 3].
        let q_pts = self.points(&self.linear_q_points, &s, &r, pq)?;
        let kv_pts = self.points(&self.linear_kv_points, &s, &r, pq + pv)?;
        let k_pts = kv_pts.narrow(3, 0, pq)?;
        let v_pts = kv_pts.narrow(3, pq, pv)?;

        // Pair bias: [B, N, N, H].
        let bias = self.linear_b.forward(&z)?;

        // Scalar logits: [B, H, N, N].
        let qh = q.permute((0, 2, 1, 3))?.contiguous()?; // [B, H, N, C]
        let kh = k.permute((0, 2, 3, 1))?.contiguous()?; // [B, H, C, N]
        let mut a = (qh.matmul(&kh)? * (1.0 / (3.0 * c as f64)).sqrt())?;
        a = (a + (bias.permute((0, 3, 1, 2))? * (1.0f64 / 3.0).sqrt())?)?;

        // Point logits: −½ w_h Σ_p |q_ip − k_jp|², [B, H, N, N].
        // DISCREPANCY: OpenFold materialises q_i − k_j ([B, N, N, H, P, 3]); we expand
        // |q − k|² = |q|² + |k|² − 2 q·k so the cross term is one batched matmul (same math,
        // different rounding: golden parity unchanged, ~1e-15 f64 / ~5e-7 f32; forward and
        // backward ~2x faster at N = 256 on CPU). The f32 cancellation error is ~1e-7·|x|² on d².
        let qp = q_pts.permute((0, 2, 1, 3, 4))?.reshape((b, h, n, pq * 3))?; // [B, H, N, P·3]
        let kp = k_pts.permute((0, 2, 1, 3, 4))?.reshape((b, h, n, pq * 3))?;
        let q2 = qp.sqr()?.sum_keepdim(D::Minus1)?; // [B, H, N, 1]
        let k2 = kp.sqr()?.sum_keepdim(D::Minus1)?.transpose(2, 3)?; // [B, H, 1, N]
        let qk = qp.matmul(&kp.transpose(2, 3)?.contiguous()?)?; // [B, H, N, N]
        let d2 = q2.broadcast_add(&k2)?.broadcast_sub(&(qk * 2.0)?)?;
        let hw = cast(&self.head_weights, dt)?;
        let hw = softplus(&hw)? * (1.0 / (3.0 * (pq as f64 * 9.0 / 2.0))).sqrt();
        let hw = (hw? * -0.5)?.reshape((1, h, 1, 1))?;
        a = (a + d2.broadcast_mul(&hw)?)?;

        // Mask bias inf·(m_i m_j − 1): [B, 1, N, N].
        let sq = mask.unsqueeze(2)?.broadcast_mul(&mask.unsqueeze(1)?)?;
        let sq = ((sq - 1.0)? * cfg.inf)?.unsqueeze(1)?;
        a = a.broadcast_add(&sq)?;
        let a = softmax(&a)?; // [B, H, N(i), N(j)]

        // Scalar output: [B, N, H·C].
        let vh = v.permute((0, 2, 1, 3))?.contiguous()?; // [B, H, N, C]
        let o = a
            .matmul(&vh)?
            .permute((0, 2, 1, 3))?
            .reshape((b, n, h * c))?;

        // Point output Σ_j a_ij v_j in the global frame, then back to the local frame of i.
        let vp = v_pts
            .permute((0, 2, 1, 3, 4))?
            .reshape((b * h, n, pv * 3))?; // [B·H, N, Pv·3]
        let a3 = a.reshape((b * h, n, n))?;
        let o_pt = a3.matmul(&vp.contiguous()?)?.reshape((b, h, n, pv, 3))?;
        let o_pt = o_pt.permute((0, 2, 1, 3, 4))?; // [B, N, H, Pv, 3]
        let o_pt = r.unsqueeze(2)?.unsqueeze(3)?.invert_apply(&o_pt)?;
        let o_pt_norm = (o_pt.sqr()?.sum(D::Minus1)? + cfg.eps)?
            .sqrt()?
            .reshape((b, n, h * pv))?;
        let o_pt = o_pt.reshape((b, n, h * pv, 3))?;
        let o_x = o_pt.narrow(3, 0, 1)?.squeeze(3)?;
        let o_y = o_pt.narrow(3, 1, 1)?.squeeze(3)?;
        let o_z = o_pt.narrow(3, 2, 1)?.squeeze(3)?;

        // Pair output Σ_j a_ij z_ij: [B, N, H·c_z].
        let at = a.permute((0, 2, 1, 3))?.contiguous()?; // [B, N(i), H, N(j)]
        let o_pair = at.matmul(&z.contiguous()?)?.reshape((b, n, h * cfg.c_z))?;

        let cat = Tensor::cat(&[o, o_x, o_y, o_z, o_pt_norm, o_pair], D::Minus1)?;
        let out = self.linear_out.forward(&cat)?;
        let mut out_dims = lead.to_vec();
        out_dims.extend([n, cfg.c_s]);
        Ok(out.reshape(out_dims)?)
    }
}

/// `log(1 + eˣ)`, switching to `x` above 20 as torch does.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let big = x.gt(20.0)?;
    // `where_cond` routes the gradient to the selected branch only; the clamp keeps exp finite.
    let safe = x.clamp(f64::NEG_INFINITY, 20.0)?;
    let sp = (safe.exp()? + 1.0)?.log()?;
    Ok(big.where_cond(x, &sp)?)
}
