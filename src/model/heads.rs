//! Auxiliary output heads (AF2 supplement section 1.9). Parameter names are OpenFold's
//! `AuxiliaryHeads` names: `plddt`, `distogram`, `masked_msa`, `experimentally_resolved`, `tm`.
//!
//! Heads produce logits only; `compute_plddt`, the losses and the metrics live in `crate::loss`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::config::{HeadsConfig, TmHead};
use crate::error::Result;
use crate::model::ipa::arg_usize;
use crate::model::primitives::{LayerNorm, Linear, LinearInit};

/// Algorithm 29 (pLDDT head, `PerResidueLDDTCaPredictor`): `LN → lin → relu → lin → relu → lin`
/// on the structure-module single representation, `[*, N, c_s]` → `[*, N, no_bins]`.
#[derive(Debug, Clone)]
pub struct PerResidueLddtCaPredictor {
    pub layer_norm: LayerNorm,
    pub linear_1: Linear,
    pub linear_2: Linear,
    pub linear_3: Linear,
}

impl PerResidueLddtCaPredictor {
    /// From OpenFold constructor arguments (JSON object).
    pub fn from_constructor_args(vb: VarBuilder, args: &serde_json::Value) -> Result<Self> {
        Self::new(
            vb,
            arg_usize(args, "c_in")?,
            arg_usize(args, "c_hidden")?,
            arg_usize(args, "no_bins")?,
        )
    }

    pub fn new(vb: VarBuilder, c_in: usize, c_hidden: usize, no_bins: usize) -> Result<Self> {
        Ok(Self {
            layer_norm: LayerNorm::new(vb.pp("layer_norm"), c_in)?,
            linear_1: Linear::new(vb.pp("linear_1"), c_in, c_hidden, true, LinearInit::Relu)?,
            linear_2: Linear::new(
                vb.pp("linear_2"),
                c_hidden,
                c_hidden,
                true,
                LinearInit::Relu,
            )?,
            linear_3: Linear::new(
                vb.pp("linear_3"),
                c_hidden,
                no_bins,
                true,
                LinearInit::Final,
            )?,
        })
    }

    pub fn forward(&self, s: &Tensor) -> Result<Tensor> {
        let x = self.layer_norm.forward(s)?;
        let x = self.linear_1.forward(&x)?.relu()?;
        let x = self.linear_2.forward(&x)?.relu()?;
        self.linear_3.forward(&x)
    }
}

/// Section 1.9.8 (distogram head): `logits = lin(z) + lin(z)ᵀ` (symmetric in i, j; the bias is
/// counted twice as in OpenFold), `[*, N, N, c_z]` → `[*, N, N, no_bins]`.
#[derive(Debug, Clone)]
pub struct DistogramHead {
    pub linear: Linear,
}

impl DistogramHead {
    /// From OpenFold constructor arguments (JSON object).
    pub fn from_constructor_args(vb: VarBuilder, args: &serde_json::Value) -> Result<Self> {
        Self::new(vb, arg_usize(args, "c_z")?, arg_usize(args, "no_bins")?)
    }

    pub fn new(vb: VarBuilder, c_z: usize, no_bins: usize) -> Result<Self> {
        Ok(Self {
            linear: Linear::new(vb.pp("linear"), c_z, no_bins, true, LinearInit::Final)?,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let l = self.linear.forward(z)?; // [*, N, N, no_bins]
        let r = l.rank();
        Ok((&l + l.transpose(r - 3, r - 2)?)?)
    }
}

/// Section 1.9.9 (masked MSA head): a linear on the MSA representation, `[*, S, N, c_m]` →
/// `[*, S, N, c_out]` (23 classes: 20 amino acids, X, gap, mask).
#[derive(Debug, Clone)]
pub struct MaskedMsaHead {
    pub linear: Linear,
}

impl MaskedMsaHead {
    /// From OpenFold constructor arguments (JSON object).
    pub fn from_constructor_args(vb: VarBuilder, args: &serde_json::Value) -> Result<Self> {
        Self::new(vb, arg_usize(args, "c_m")?, arg_usize(args, "c_out")?)
    }

    pub fn new(vb: VarBuilder, c_m: usize, c_out: usize) -> Result<Self> {
        Ok(Self {
            linear: Linear::new(vb.pp("linear"), c_m, c_out, true, LinearInit::Final)?,
        })
    }

    pub fn forward(&self, m: &Tensor) -> Result<Tensor> {
        self.linear.forward(m)
    }
}

/// Section 1.9.10 (experimentally resolved head): a linear on the (Evoformer) single
/// representation, `[*, N, c_s]` → `[*, N, 37]` atom37 logits.
#[derive(Debug, Clone)]
pub struct ExperimentallyResolvedHead {
    pub linear: Linear,
}

impl ExperimentallyResolvedHead {
    /// From OpenFold constructor arguments (JSON object).
    pub fn from_constructor_args(vb: VarBuilder, args: &serde_json::Value) -> Result<Self> {
        Self::new(vb, arg_usize(args, "c_s")?, arg_usize(args, "c_out")?)
    }

    pub fn new(vb: VarBuilder, c_s: usize, c_out: usize) -> Result<Self> {
        Ok(Self {
            linear: Linear::new(vb.pp("linear"), c_s, c_out, true, LinearInit::Final)?,
        })
    }

    pub fn forward(&self, s: &Tensor) -> Result<Tensor> {
        self.linear.forward(s)
    }
}

/// Section 1.9.7 (predicted aligned error / TM-score head): a linear on the pair representation,
/// `[*, N, N, c_z]` → `[*, N, N, no_bins]` (not symmetrised).
#[derive(Debug, Clone)]
pub struct TmScoreHead {
    pub linear: Linear,
}

impl TmScoreHead {
    /// From OpenFold constructor arguments (JSON object).
    pub fn from_constructor_args(vb: VarBuilder, args: &serde_json::Value) -> Result<Self> {
        Self::new(vb, arg_usize(args, "c_z")?, arg_usize(args, "no_bins")?)
    }

    pub fn new(vb: VarBuilder, c_z: usize, no_bins: usize) -> Result<Self> {
        Ok(Self {
            linear: Linear::new(vb.pp("linear"), c_z, no_bins, true, LinearInit::Final)?,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        self.linear.forward(z)
    }
}

/// Logits of every head.
#[derive(Debug, Clone)]
pub struct HeadOutputs {
    /// `[*, N, plddt_no_bins]`
    pub lddt_logits: Tensor,
    /// `[*, N, N, distogram_no_bins]`
    pub distogram_logits: Tensor,
    /// `[*, S, N, masked_msa_c_out]`
    pub masked_msa_logits: Tensor,
    /// `[*, N, 37]`
    pub experimentally_resolved_logits: Tensor,
    /// `[*, N, N, tm_no_bins]` when the TM head is on.
    pub tm_logits: Option<Tensor>,
}

/// OpenFold `AuxiliaryHeads` (monomer): every head under its OpenFold name.
#[derive(Debug, Clone)]
pub struct AuxiliaryHeads {
    pub plddt: PerResidueLddtCaPredictor,
    pub distogram: DistogramHead,
    pub masked_msa: MaskedMsaHead,
    pub experimentally_resolved: ExperimentallyResolvedHead,
    pub tm: Option<TmScoreHead>,
}

impl AuxiliaryHeads {
    pub fn new(
        vb: VarBuilder,
        c_m: usize,
        c_z: usize,
        c_s: usize,
        cfg: &HeadsConfig,
    ) -> Result<Self> {
        let tm = match cfg.tm {
            TmHead::On => Some(TmScoreHead::new(vb.pp("tm"), c_z, cfg.tm_no_bins)?),
            TmHead::Off => None,
        };
        Ok(Self {
            plddt: PerResidueLddtCaPredictor::new(
                vb.pp("plddt"),
                c_s,
                cfg.plddt_c_hidden,
                cfg.plddt_no_bins,
            )?,
            distogram: DistogramHead::new(vb.pp("distogram"), c_z, cfg.distogram_no_bins)?,
            masked_msa: MaskedMsaHead::new(vb.pp("masked_msa"), c_m, cfg.masked_msa_c_out)?,
            experimentally_resolved: ExperimentallyResolvedHead::new(
                vb.pp("experimentally_resolved"),
                c_s,
                cfg.experimentally_resolved_c_out,
            )?,
            tm,
        })
    }

    /// `sm_single` is the structure module's final single representation (pLDDT input);
    /// `evo_single` the Evoformer's single representation (experimentally-resolved input), as in
    /// OpenFold.
    pub fn forward(
        &self,
        sm_single: &Tensor,
        evo_single: &Tensor,
        msa: &Tensor,
        pair: &Tensor,
    ) -> Result<HeadOutputs> {
        Ok(HeadOutputs {
            lddt_logits: self.plddt.forward(sm_single)?,
            distogram_logits: self.distogram.forward(pair)?,
            masked_msa_logits: self.masked_msa.forward(msa)?,
            experimentally_resolved_logits: self.experimentally_resolved.forward(evo_single)?,
            tm_logits: match &self.tm {
                Some(t) => Some(t.forward(pair)?),
                None => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn head_shapes_and_distogram_symmetry() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let cfg = HeadsConfig {
            plddt_c_hidden: 6,
            tm: TmHead::On,
            ..HeadsConfig::default()
        };
        let heads = AuxiliaryHeads::new(vb, 5, 4, 7, &cfg).unwrap();
        // Give the (zero-initialised) final layers non-zero weights.
        for (_, v) in vm.data().lock().unwrap().iter() {
            let r = Tensor::randn(0.0f64, 1.0, v.shape(), &dev).unwrap();
            v.set(&r).unwrap();
        }
        let s = Tensor::randn(0.0f64, 1.0, (2, 9, 7), &dev).unwrap();
        let m = Tensor::randn(0.0f64, 1.0, (2, 3, 9, 5), &dev).unwrap();
        let z = Tensor::randn(0.0f64, 1.0, (2, 9, 9, 4), &dev).unwrap();
        let out = heads.forward(&s, &s, &m, &z).unwrap();
        assert_eq!(out.lddt_logits.dims(), &[2, 9, 50]);
        assert_eq!(out.distogram_logits.dims(), &[2, 9, 9, 64]);
        assert_eq!(out.masked_msa_logits.dims(), &[2, 3, 9, 23]);
        assert_eq!(out.experimentally_resolved_logits.dims(), &[2, 9, 37]);
        let tm = out.tm_logits.unwrap();
        assert_eq!(tm.dims(), &[2, 9, 9, 64]);
        let d = &out.distogram_logits;
        let asym = (d - d.transpose(1, 2).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(asym.to_scalar::<f64>().unwrap(), 0.0);
        // The TM head is not symmetrised.
        let asym = (&tm - tm.transpose(1, 2).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(asym.to_scalar::<f64>().unwrap() > 0.0);
    }
}
