//! Golden parity of every OpenFold module fixture (`$FERROFOLD_GOLDEN_DIR/modules/*`).
//!
//! Data-driven: each fixture names its OpenFold class; [`REGISTRY`] maps the class to a runner
//! `fn(&Fixture, DType) -> Result<Outcome>` that builds the module from the sidecar's
//! `constructor_args`, loads `param.*`, runs forward on `input.*` and backpropagates
//! `L = Σ_k sum(output_k · cotangent_k)`. The comparison (outputs, `grad.param.*`, `grad.input.*`)
//! is shared. Sizes come only from the sidecar, so a new fixture of a registered class needs no
//! code change. To add a class: write a runner with [`Harness`] (see `run_msa_row`) and add one
//! [`REGISTRY`] line, e.g.
//!
//! ```ignore
//! masked("InvariantPointAttention", run_ipa, sm_valid_region, SINGLE),
//! ```
//!
//! Tolerances (fixtures' README): float64 rel ≤ 1e-10 against the fixture; float32 rel ≤ `f32_rel`
//! (1e-5 single modules and heads, 5e-5 stacks/blocks and the structure module); gradients listed
//! as structurally zero use abs ≤ 1e-12 (f64) / 5e-5 (f32). Fixtures whose float32 error summary
//! says fully-masked rows blow up (`outputs_max_rel > 1e-4`: `evoformer_block_padded`, IPA, SM)
//! are compared in float32 in the valid region only: outputs masked with `valid_region(fx, name)`,
//! gradients recomputed with cotangents zeroed outside it and compared with our own float64 run
//! (itself checked against the fixture by `golden_modules_f64`).
//!
//! A fixture whose class is not in [`REGISTRY`] fails the tests: nothing is skipped.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, IndexOp, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::golden::{errors, fixtures_in, Fixture, Report};
use ferrofold::config::StackConfig;
use ferrofold::geometry::rigid::Rigid;
use ferrofold::model::embedders::{InputEmbedder, RecyclingEmbedder};
use ferrofold::model::evoformer::{BlockConfig, EvoformerBlock, EvoformerStack, MsaBlock};
use ferrofold::model::extra_msa::ExtraMsaBlock;
use ferrofold::model::heads::{
    DistogramHead, ExperimentallyResolvedHead, MaskedMsaHead, PerResidueLddtCaPredictor,
};
use ferrofold::model::ipa::{InvariantPointAttention, IpaConfig};
use ferrofold::model::msa::{
    MsaColumnAttention, MsaColumnGlobalAttention, MsaRowAttentionWithPairBias,
};
use ferrofold::model::outer_product_mean::OuterProductMean;
use ferrofold::model::params::{sorted_vars, varmap_from_tensors};
use ferrofold::model::structure_module::StructureModule;
use ferrofold::model::transition::Transition;
use ferrofold::model::triangle_attention::TriangleAttention;
use ferrofold::model::triangle_multiplication::TriangleMultiplication;
use ferrofold::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

/// What a runner returns: forward outputs by name (without `output.`) and gradients by full
/// fixture name (`grad.param.<p>`, `grad.input.<x>`).
pub struct Outcome {
    pub outputs: BTreeMap<String, Tensor>,
    pub grads: BTreeMap<String, Tensor>,
}

pub type RunFn = fn(&Fixture, DType) -> Result<Outcome>;

/// Mask (broadcastable to the output) of the valid region of output `name`, for fixtures whose
/// fully-masked attention rows are only comparable there in float32 (see the fixtures' README).
pub type ValidRegionFn = fn(&Fixture, &str) -> Option<Tensor>;

pub struct Entry {
    /// Last path segment of `openfold_class`.
    pub class: &'static str,
    pub run: RunFn,
    pub valid_region: Option<ValidRegionFn>,
    /// float32 relative tolerance (1e-5 single modules and heads, 5e-5 stacks/blocks and SM).
    pub f32_rel: f64,
}

const SINGLE: f64 = 1e-5;
const STACK: f64 = 5e-5;

/// A single module: float32 tolerance 1e-5, no fully-masked rows.
pub const fn single(class: &'static str, run: RunFn) -> Entry {
    Entry {
        class,
        run,
        valid_region: None,
        f32_rel: SINGLE,
    }
}

/// A trunk block/stack: float32 tolerance 5e-5; valid region = MSA/pair masks.
pub const fn trunk(class: &'static str, run: RunFn) -> Entry {
    Entry {
        class,
        run,
        valid_region: Some(trunk_valid_region),
        f32_rel: STACK,
    }
}

/// A module with fully-masked rows in its fixture: compared in float32 in `region` only.
pub const fn masked(class: &'static str, run: RunFn, region: ValidRegionFn, f32_rel: f64) -> Entry {
    Entry {
        class,
        run,
        valid_region: Some(region),
        f32_rel,
    }
}

pub const REGISTRY: &[Entry] = &[
    single("MSARowAttentionWithPairBias", run_msa_row),
    single("MSAColumnAttention", run_msa_col),
    single("MSAColumnGlobalAttention", run_msa_col_global),
    single("MSATransition", run_msa_transition),
    single("OuterProductMean", run_opm),
    single("TriangleMultiplicationOutgoing", run_tri_mul_out),
    single("TriangleMultiplicationIncoming", run_tri_mul_in),
    single("TriangleAttentionStartingNode", run_tri_att_start),
    single("TriangleAttentionEndingNode", run_tri_att_end),
    single("PairTransition", run_pair_transition),
    trunk("EvoformerBlock", run_evoformer_block),
    trunk("EvoformerStack", run_evoformer_stack),
    trunk("ExtraMSABlock", run_extra_msa_block),
    single("InputEmbedder", run_input_embedder),
    single("RecyclingEmbedder", run_recycling_embedder),
    masked("InvariantPointAttention", run_ipa, sm_valid_region, SINGLE),
    masked(
        "StructureModule",
        run_structure_module,
        sm_valid_region,
        STACK,
    ),
    single("DistogramHead", run_head::<DistogramHead>),
    single("MaskedMSAHead", run_head::<MaskedMsaHead>),
    single(
        "PerResidueLDDTCaPredictor",
        run_head::<PerResidueLddtCaPredictor>,
    ),
    single(
        "ExperimentallyResolvedHead",
        run_head::<ExperimentallyResolvedHead>,
    ),
];

/// Modules with a hand-written backward (`forward_saved` + `backward`, see `model::vjp`): the same
/// fixtures, differentiated without candle's autograd.
pub const MANUAL_REGISTRY: &[Entry] = &[
    single("MSATransition", run_msa_transition_manual),
    single("PairTransition", run_pair_transition_manual),
    trunk("EvoformerBlock", run_evoformer_block_manual),
    trunk("ExtraMSABlock", run_extra_msa_block_manual),
    single("OuterProductMean", run_opm_manual),
    single("TriangleMultiplicationOutgoing", run_tri_mul_out_manual),
    single("TriangleMultiplicationIncoming", run_tri_mul_in_manual),
    single("MSARowAttentionWithPairBias", run_msa_row_manual),
    single("MSAColumnAttention", run_msa_col_manual),
    single("MSAColumnGlobalAttention", run_msa_col_global_manual),
    single("TriangleAttentionStartingNode", run_tri_att_start_manual),
    single("TriangleAttentionEndingNode", run_tri_att_end_manual),
];

// ---------------------------------------------------------------------------------------------
// Harness shared by runners
// ---------------------------------------------------------------------------------------------

/// Builds a module's parameters from a fixture and turns its outputs into an [`Outcome`].
pub struct Harness<'f> {
    fx: &'f Fixture,
    dtype: DType,
    vm: VarMap,
    inputs: BTreeMap<String, Var>,
}

impl<'f> Harness<'f> {
    pub fn new(fx: &'f Fixture, dtype: DType) -> Result<Self> {
        let vm = varmap_from_tensors(fx.params(DType::F64), dtype)?;
        Ok(Self {
            fx,
            dtype,
            vm,
            inputs: BTreeMap::new(),
        })
    }

    pub fn vb(&self) -> VarBuilder<'static> {
        VarBuilder::from_varmap(&self.vm, self.dtype, &candle_core::Device::Cpu)
    }

    /// A float input in the run dtype; a `Var` (differentiated) if listed in `grad_inputs`.
    pub fn input(&mut self, name: &str) -> Result<Tensor> {
        let t = self.fx.get_as(&format!("input.{name}"), self.dtype);
        if self.fx.grad_inputs().iter().any(|g| g == name) {
            let v = Var::from_tensor(&t)?;
            let out = v.as_tensor().clone();
            self.inputs.insert(name.to_string(), v);
            Ok(out)
        } else {
            Ok(t)
        }
    }

    /// An integer input as stored (i64).
    pub fn int_input(&self, name: &str) -> Tensor {
        self.fx.get(&format!("input.{name}"))
    }

    pub fn arg(&self, key: &str) -> usize {
        self.fx.arg_usize(key)
    }

    pub fn argf(&self, key: &str) -> f64 {
        self.fx.arg_f64(key)
    }

    /// Check the parameter names, backpropagate the cotangents and collect every gradient.
    pub fn finish(self, outputs: Vec<(&str, Tensor)>) -> Result<Outcome> {
        let expected: BTreeSet<String> = self.fx.names_with_prefix("param.").into_iter().collect();
        let vars = sorted_vars(&self.vm);
        let have: BTreeSet<String> = vars.iter().map(|(k, _)| k.clone()).collect();
        if have != expected {
            let extra: Vec<_> = have.difference(&expected).collect();
            let missing: Vec<_> = expected.difference(&have).collect();
            return Err(Error::Model(format!(
                "parameter names differ: created but not in fixture {extra:?}; in fixture but unused {missing:?}"
            )));
        }
        let mut loss: Option<Tensor> = None;
        for name in self.fx.cotangent_outputs() {
            let out = outputs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::Model(format!("runner produced no output `{name}`")))?;
            let cot = self.fx.get_as(&format!("cotangent.{name}"), self.dtype);
            let term = (out * cot)?.sum_all()?;
            loss = Some(match loss {
                None => term,
                Some(l) => (l + term)?,
            });
        }
        let loss = loss.ok_or_else(|| Error::Model("fixture has no cotangents".into()))?;
        let store = loss.backward()?;
        let mut grads = BTreeMap::new();
        for (name, var) in &vars {
            let g = match store.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => var.as_tensor().zeros_like()?,
            };
            grads.insert(format!("grad.param.{name}"), g);
        }
        for (name, var) in &self.inputs {
            let g = match store.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => var.as_tensor().zeros_like()?,
            };
            grads.insert(format!("grad.input.{name}"), g);
        }
        let outputs = outputs
            .into_iter()
            .map(|(n, t)| (n.to_string(), t.detach()))
            .collect();
        Ok(Outcome { outputs, grads })
    }

    /// [`Self::finish`] for a hand-written backward: `backward` gets the cotangents of the
    /// fixture's outputs (in `cotangent_outputs` order) and a gradient store, adds the parameter
    /// gradients to the store and returns `(input name, gradient)` pairs.
    pub fn finish_manual(
        self,
        outputs: Vec<(&str, Tensor)>,
        backward: impl FnOnce(&[Tensor], &mut GradStore) -> Result<Vec<(&'static str, Tensor)>>,
    ) -> Result<Outcome> {
        let mut cots = Vec::new();
        for name in self.fx.cotangent_outputs() {
            if !outputs.iter().any(|(n, _)| *n == name) {
                return Err(Error::Model(format!("runner produced no output `{name}`")));
            }
            cots.push(self.fx.get_as(&format!("cotangent.{name}"), self.dtype));
        }
        let mut store = GradStore::default();
        let d_in = backward(&cots, &mut store)?;
        let mut grads = BTreeMap::new();
        for (name, var) in sorted_vars(&self.vm) {
            let g = match store.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => var.as_tensor().zeros_like()?,
            };
            grads.insert(format!("grad.param.{name}"), g);
        }
        for name in self.inputs.keys() {
            let g = d_in
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, g)| g.clone())
                .ok_or_else(|| Error::Model(format!("no gradient for input `{name}`")))?;
            grads.insert(format!("grad.input.{name}"), g);
        }
        let outputs = outputs
            .into_iter()
            .map(|(n, t)| (n.to_string(), t.detach()))
            .collect();
        Ok(Outcome { outputs, grads })
    }
}

// ---------------------------------------------------------------------------------------------
// Runners: trunk and embedders
// ---------------------------------------------------------------------------------------------

fn run_msa_row(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = MsaRowAttentionWithPairBias::new(
        h.vb(),
        h.arg("c_m"),
        h.arg("c_z"),
        h.arg("c_hidden"),
        h.arg("no_heads"),
        h.argf("inf"),
    )?;
    let (m, z, mask) = (h.input("m")?, h.input("z")?, h.input("mask")?);
    let out = module.forward(&m, &z, &mask)?;
    h.finish(vec![("m_update", out)])
}

fn run_msa_col(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = MsaColumnAttention::new(
        h.vb(),
        h.arg("c_m"),
        h.arg("c_hidden"),
        h.arg("no_heads"),
        h.argf("inf"),
    )?;
    let (m, mask) = (h.input("m")?, h.input("mask")?);
    let out = module.forward(&m, &mask)?;
    h.finish(vec![("m_update", out)])
}

fn run_msa_col_global(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = MsaColumnGlobalAttention::new(
        h.vb(),
        h.arg("c_in"),
        h.arg("c_hidden"),
        h.arg("no_heads"),
        h.argf("inf"),
        h.argf("eps"),
    )?;
    let (m, mask) = (h.input("m")?, h.input("mask")?);
    let out = module.forward(&m, &mask)?;
    h.finish(vec![("m_update", out)])
}

fn run_msa_row_manual(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = MsaRowAttentionWithPairBias::new(
        h.vb(),
        h.arg("c_m"),
        h.arg("c_z"),
        h.arg("c_hidden"),
        h.arg("no_heads"),
        h.argf("inf"),
    )?;
    let (m, z, mask) = (h.input("m")?, h.input("z")?, h.input("mask")?);
    let (out, saved) = module.forward_saved(&m, &z, &mask)?;
    h.finish_manual(vec![("m_update", out)], |cot, g| {
        let (dm, dz) = module.backward(saved, &cot[0], g)?;
        Ok(vec![("m", dm), ("z", dz)])
    })
}

fn run_msa_col_manual(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = MsaColumnAttention::new(
        h.vb(),
        h.arg("c_m"),
        h.arg("c_hidden"),
        h.arg("no_heads"),
        h.argf("inf"),
    )?;
    let (m, mask) = (h.input("m")?, h.input("mask")?);
    let (out, saved) = module.forward_saved(&m, &mask)?;
    h.finish_manual(vec![("m_update", out)], |cot, g| {
        Ok(vec![("m", module.backward(saved, &cot[0], g)?)])
    })
}

fn run_msa_col_global_manual(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = MsaColumnGlobalAttention::new(
        h.vb(),
        h.arg("c_in"),
        h.arg("c_hidden"),
        h.arg("no_heads"),
        h.argf("inf"),
        h.argf("eps"),
    )?;
    let (m, mask) = (h.input("m")?, h.input("mask")?);
    let (out, saved) = module.forward_saved(&m, &mask)?;
    h.finish_manual(vec![("m_update", out)], |cot, g| {
        Ok(vec![("m", module.backward(saved, &cot[0], g)?)])
    })
}

fn run_msa_transition(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = Transition::new(h.vb(), h.arg("c_m"), h.arg("n"))?;
    let (m, mask) = (h.input("m")?, h.input("mask")?);
    let out = module.forward(&m, Some(&mask))?;
    h.finish(vec![("m_update", out)])
}

fn run_msa_transition_manual(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = Transition::new(h.vb(), h.arg("c_m"), h.arg("n"))?;
    let (m, mask) = (h.input("m")?, h.input("mask")?);
    let (out, saved) = module.forward_saved(&m, Some(&mask))?;
    h.finish_manual(vec![("m_update", out)], |cot, g| {
        Ok(vec![("m", module.backward(saved, &cot[0], g)?)])
    })
}

fn run_pair_transition_manual(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = Transition::new(h.vb(), h.arg("c_z"), h.arg("n"))?;
    let (z, mask) = (h.input("z")?, h.input("mask")?);
    let (out, saved) = module.forward_saved(&z, Some(&mask))?;
    h.finish_manual(vec![("z_update", out)], |cot, g| {
        Ok(vec![("z", module.backward(saved, &cot[0], g)?)])
    })
}

fn run_pair_transition(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = Transition::new(h.vb(), h.arg("c_z"), h.arg("n"))?;
    let (z, mask) = (h.input("z")?, h.input("mask")?);
    let out = module.forward(&z, Some(&mask))?;
    h.finish(vec![("z_update", out)])
}

fn run_opm(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = OuterProductMean::new(
        h.vb(),
        h.arg("c_m"),
        h.arg("c_z"),
        h.arg("c_hidden"),
        h.argf("eps"),
    )?;
    let (m, mask) = (h.input("m")?, h.input("mask")?);
    let out = module.forward(&m, &mask)?;
    h.finish(vec![("z_update", out)])
}

fn run_opm_manual(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = OuterProductMean::new(
        h.vb(),
        h.arg("c_m"),
        h.arg("c_z"),
        h.arg("c_hidden"),
        h.argf("eps"),
    )?;
    let (m, mask) = (h.input("m")?, h.input("mask")?);
    let (out, saved) = module.forward_saved(&m, &mask)?;
    h.finish_manual(vec![("z_update", out)], |cot, g| {
        Ok(vec![("m", module.backward(saved, &cot[0], g)?)])
    })
}

fn run_tri_mul_manual(fx: &Fixture, dt: DType, outgoing: bool) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = TriangleMultiplication::new(h.vb(), h.arg("c_z"), h.arg("c_hidden"), outgoing)?;
    let (z, mask) = (h.input("z")?, h.input("mask")?);
    let (out, saved) = module.forward_saved(&z, &mask)?;
    h.finish_manual(vec![("z_update", out)], |cot, g| {
        Ok(vec![("z", module.backward(saved, &cot[0], g)?)])
    })
}

fn run_tri_mul_out_manual(fx: &Fixture, dt: DType) -> Result<Outcome> {
    run_tri_mul_manual(fx, dt, true)
}

fn run_tri_mul_in_manual(fx: &Fixture, dt: DType) -> Result<Outcome> {
    run_tri_mul_manual(fx, dt, false)
}

fn run_tri_mul(fx: &Fixture, dt: DType, outgoing: bool) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = TriangleMultiplication::new(h.vb(), h.arg("c_z"), h.arg("c_hidden"), outgoing)?;
    let (z, mask) = (h.input("z")?, h.input("mask")?);
    let out = module.forward(&z, &mask)?;
    h.finish(vec![("z_update", out)])
}

fn run_tri_mul_out(fx: &Fixture, dt: DType) -> Result<Outcome> {
    run_tri_mul(fx, dt, true)
}

fn run_tri_mul_in(fx: &Fixture, dt: DType) -> Result<Outcome> {
    run_tri_mul(fx, dt, false)
}

fn run_tri_att(fx: &Fixture, dt: DType, starting: bool) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = TriangleAttention::new(
        h.vb(),
        h.arg("c_in"),
        h.arg("c_hidden"),
        h.arg("no_heads"),
        starting,
        h.argf("inf"),
    )?;
    let (x, mask) = (h.input("x")?, h.input("mask")?);
    let out = module.forward(&x, &mask)?;
    h.finish(vec![("z_update", out)])
}

fn run_tri_att_start(fx: &Fixture, dt: DType) -> Result<Outcome> {
    run_tri_att(fx, dt, true)
}

fn run_tri_att_end(fx: &Fixture, dt: DType) -> Result<Outcome> {
    run_tri_att(fx, dt, false)
}

fn run_tri_att_manual(fx: &Fixture, dt: DType, starting: bool) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = TriangleAttention::new(
        h.vb(),
        h.arg("c_in"),
        h.arg("c_hidden"),
        h.arg("no_heads"),
        starting,
        h.argf("inf"),
    )?;
    let (x, mask) = (h.input("x")?, h.input("mask")?);
    let (out, saved) = module.forward_saved(&x, &mask)?;
    h.finish_manual(vec![("z_update", out)], |cot, g| {
        Ok(vec![("x", module.backward(saved, &cot[0], g)?)])
    })
}

fn run_tri_att_start_manual(fx: &Fixture, dt: DType) -> Result<Outcome> {
    run_tri_att_manual(fx, dt, true)
}

fn run_tri_att_end_manual(fx: &Fixture, dt: DType) -> Result<Outcome> {
    run_tri_att_manual(fx, dt, false)
}

/// `BlockConfig` from EvoformerBlock/EvoformerStack/ExtraMSABlock constructor args.
fn block_config(fx: &Fixture) -> Result<BlockConfig> {
    let args = fx.args();
    for flag in [
        "opm_first",
        "fuse_projection_weights",
        "no_column_attention",
    ] {
        if args[flag].as_bool() == Some(true) {
            return Err(Error::Model(format!(
                "{}: `{flag}=True` is not supported",
                fx.name
            )));
        }
    }
    let stack = StackConfig {
        num_blocks: args["no_blocks"].as_u64().unwrap_or(1) as usize,
        c_hidden_msa_att: fx.arg_usize("c_hidden_msa_att"),
        no_heads_msa: fx.arg_usize("no_heads_msa"),
        c_hidden_opm: fx.arg_usize("c_hidden_opm"),
        c_hidden_mul: fx.arg_usize("c_hidden_mul"),
        c_hidden_pair_att: fx.arg_usize("c_hidden_pair_att"),
        no_heads_pair: fx.arg_usize("no_heads_pair"),
        transition_n: fx.arg_usize("transition_n"),
        msa_dropout: fx.arg_f64("msa_dropout"),
        pair_dropout: fx.arg_f64("pair_dropout"),
    };
    Ok(BlockConfig {
        c_m: fx.arg_usize("c_m"),
        c_z: fx.arg_usize("c_z"),
        stack,
        inf: fx.arg_f64("inf"),
        eps_opm: 1e-3,
        eps_global: fx.arg_f64("eps"),
        backward: ferrofold::config::TrunkBackward::Manual,
    })
}

fn run_evoformer_block(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let block = EvoformerBlock::new(h.vb(), &block_config(fx)?)?;
    let (m, z) = (h.input("m")?, h.input("z")?);
    let (mm, pm) = (h.input("msa_mask")?, h.input("pair_mask")?);
    let (m, z) = block.forward(&m, &z, &mm, &pm, None)?;
    h.finish(vec![("m", m), ("z", z)])
}

fn run_evoformer_block_manual(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let block = EvoformerBlock::new(h.vb(), &block_config(fx)?)?;
    let (m, z) = (h.input("m")?, h.input("z")?);
    let (mm, pm) = (h.input("msa_mask")?, h.input("pair_mask")?);
    let (m, z, saved) = block.parts().forward_saved(&m, &z, &mm, &pm, None)?;
    h.finish_manual(vec![("m", m), ("z", z)], |cot, g| {
        let (dm, dz) = block.parts().backward(saved, &cot[0], &cot[1], None, g)?;
        Ok(vec![("m", dm), ("z", dz)])
    })
}

fn run_extra_msa_block_manual(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let block = ExtraMsaBlock::new(h.vb(), &block_config(fx)?)?;
    let (m, z) = (h.input("m")?, h.input("z")?);
    let (mm, pm) = (h.input("msa_mask")?, h.input("pair_mask")?);
    let (m, z, saved) = block.parts().forward_saved(&m, &z, &mm, &pm, None)?;
    h.finish_manual(vec![("m", m), ("z", z)], |cot, g| {
        let (dm, dz) = block.parts().backward(saved, &cot[0], &cot[1], None, g)?;
        Ok(vec![("m", dm), ("z", dz)])
    })
}

fn run_evoformer_stack(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let stack = EvoformerStack::new(h.vb(), &block_config(fx)?, fx.arg_usize("c_s"))?;
    let (m, z) = (h.input("m")?, h.input("z")?);
    let (mm, pm) = (h.input("msa_mask")?, h.input("pair_mask")?);
    let out = stack.forward(&m, &z, &mm, &pm, None)?;
    h.finish(vec![("m", out.m), ("z", out.z), ("s", out.s)])
}

fn run_extra_msa_block(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let block = ExtraMsaBlock::new(h.vb(), &block_config(fx)?)?;
    let (m, z) = (h.input("m")?, h.input("z")?);
    let (mm, pm) = (h.input("msa_mask")?, h.input("pair_mask")?);
    let (m, z) = block.forward(&m, &z, &mm, &pm, None)?;
    h.finish(vec![("m", m), ("z", z)])
}

fn run_input_embedder(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = InputEmbedder::new(
        h.vb(),
        h.arg("tf_dim"),
        h.arg("msa_dim"),
        h.arg("c_z"),
        h.arg("c_m"),
        h.arg("relpos_k"),
    )?;
    let (tf, msa) = (h.input("tf")?, h.input("msa")?);
    let ri = h.int_input("ri");
    let (msa_emb, pair_emb) = module.forward(&tf, &ri, &msa)?;
    h.finish(vec![("msa_emb", msa_emb), ("pair_emb", pair_emb)])
}

fn run_recycling_embedder(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let module = RecyclingEmbedder::new(
        h.vb(),
        h.arg("c_m"),
        h.arg("c_z"),
        h.argf("min_bin"),
        h.argf("max_bin"),
        h.arg("no_bins"),
        h.argf("inf"),
    )?;
    let (m, z, x) = (h.input("m")?, h.input("z")?, h.input("x")?);
    let (mu, zu) = module.forward(&m, &z, &x)?;
    h.finish(vec![("m_update", mu), ("z_update", zu)])
}

/// Trunk blocks: `m` is valid where `msa_mask` is 1, `z` where `pair_mask` is 1; `s` (first MSA
/// row → single) where the first row's mask is 1.
fn trunk_valid_region(fx: &Fixture, output: &str) -> Option<Tensor> {
    match output {
        "m" => fx.get("input.msa_mask").unsqueeze(2).ok(),
        "z" => fx.get("input.pair_mask").unsqueeze(2).ok(),
        "s" => fx
            .get("input.msa_mask")
            .narrow(0, 0, 1)
            .ok()?
            .squeeze(0)
            .ok()?
            .unsqueeze(1)
            .ok(),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Runners: IPA, structure module, heads
// ---------------------------------------------------------------------------------------------

fn run_ipa(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let ipa = InvariantPointAttention::new(h.vb(), &IpaConfig::from_constructor_args(fx.args())?)?;
    let (s, z, mask) = (h.input("s")?, h.input("z")?, h.input("mask")?);
    let r = Rigid::new(h.input("rots")?, h.input("trans")?)?;
    let out = ipa.forward(&s, &z, &r, &mask)?;
    h.finish(vec![("s_update", out)])
}

fn run_structure_module(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let mut h = Harness::new(fx, dt)?;
    let sm = StructureModule::from_constructor_args(h.vb(), fx.args())?;
    let (s, z, mask) = (h.input("s")?, h.input("z")?, h.input("mask")?);
    let o = sm.forward(&s, &z, &h.int_input("aatype"), &mask, None)?;
    // `final_*`: the last layer (forward-only outputs).
    let last = |t: &Tensor| -> Result<Tensor> { Ok(t.i(t.dim(0)? - 1)?) };
    let finals = (last(&o.positions)?, last(&o.frames)?, last(&o.angles)?);
    h.finish(vec![
        ("frames", o.frames),
        ("sidechain_frames", o.sidechain_frames),
        ("unnormalized_angles", o.unnormalized_angles),
        ("angles", o.angles),
        ("positions", o.positions),
        ("states", o.states),
        ("single", o.single),
        ("final_atom14_positions", finals.0),
        ("final_frames", finals.1),
        ("final_angles", finals.2),
    ])
}

/// IPA / SM: residue rows where `input.mask` is 1. The residue dim of an output is 0 for
/// `s_update`, `single` and `final_*`, 1 for the per-layer stacks (`frames`, `positions`, ...).
fn sm_valid_region(fx: &Fixture, output: &str) -> Option<Tensor> {
    let rank = fx.tensors.get(&format!("output.{output}"))?.rank();
    let per_layer = !(output == "s_update" || output == "single" || output.starts_with("final_"));
    let dim = usize::from(per_layer);
    let mask = fx.get("input.mask");
    let mut shape = vec![1usize; rank];
    shape[dim] = mask.dim(0).ok()?;
    mask.reshape(shape).ok()
}

/// An output head built from constructor args: one input, `logits` out.
trait Head: Sized {
    fn build(vb: VarBuilder, args: &serde_json::Value) -> Result<Self>;
    fn logits(&self, x: &Tensor) -> Result<Tensor>;
}

macro_rules! impl_head {
    ($($t:ty),*) => {$(
        impl Head for $t {
            fn build(vb: VarBuilder, args: &serde_json::Value) -> Result<Self> {
                <$t>::from_constructor_args(vb, args)
            }
            fn logits(&self, x: &Tensor) -> Result<Tensor> {
                self.forward(x)
            }
        }
    )*};
}

impl_head!(
    DistogramHead,
    MaskedMsaHead,
    PerResidueLddtCaPredictor,
    ExperimentallyResolvedHead
);

/// A head's input is its fixture's single differentiated input (`z`, `m` or `s`).
fn run_head<H: Head>(fx: &Fixture, dt: DType) -> Result<Outcome> {
    let [input] = fx.grad_inputs().try_into().map_err(|g: Vec<String>| {
        Error::Model(format!("{}: a head takes one input, got {g:?}", fx.name))
    })?;
    let mut h = Harness::new(fx, dt)?;
    let head = H::build(h.vb(), fx.args())?;
    let x = h.input(&input)?;
    let logits = head.logits(&x)?;
    h.finish(vec![("logits", logits)])
}

// ---------------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------------

/// Whether float32 results are only meaningful in the valid region (fully-masked rows; README).
fn needs_valid_region(fx: &Fixture) -> bool {
    fx.meta["float32_vs_float64"]["summary"]["outputs_max_rel"]
        .as_f64()
        .is_some_and(|r| r > 1e-4)
}

/// A copy of `fx` with every cotangent zeroed outside its output's valid region.
fn masked_cotangents(fx: &Fixture, region: ValidRegionFn) -> std::result::Result<Fixture, String> {
    let mut tensors = fx.tensors.clone();
    for name in fx.cotangent_outputs() {
        let key = format!("cotangent.{name}");
        let mask = region(fx, &name).ok_or(format!("no valid region for output `{name}`"))?;
        let c = fx
            .get(&key)
            .broadcast_mul(&mask)
            .map_err(|e| e.to_string())?;
        tensors.insert(key, c);
    }
    Ok(Fixture {
        name: fx.name.clone(),
        json_path: fx.json_path.clone(),
        meta: fx.meta.clone(),
        tensors,
    })
}

fn compare_outcome(
    rep: &mut Report,
    fx: &Fixture,
    got: &Outcome,
    want_out: &dyn Fn(&str) -> Tensor,
    want_grad: &dyn Fn(&str) -> Tensor,
    rel: f64,
    sz_abs: f64,
) -> (f64, f64) {
    let sz = fx.structurally_zero();
    let (mut worst_out, mut worst_grad) = (0.0f64, 0.0f64);
    for name in fx.names_with_prefix("output.") {
        match got.outputs.get(&name) {
            Some(t) => {
                let w = want_out(&name);
                if t.dims() == w.dims() {
                    worst_out = worst_out.max(errors(t, &w).0);
                }
                rep.check(&format!("{}: output.{name}", fx.name), t, &w, rel, 0.0)
            }
            None => rep.fail(format!("{}: output.{name} not produced", fx.name)),
        }
    }
    for name in fx.names_with_prefix("grad.") {
        let key = format!("grad.{name}");
        let Some(t) = got.grads.get(&key) else {
            rep.fail(format!("{}: {key} not produced", fx.name));
            continue;
        };
        let abs = if sz.contains(&key) { sz_abs } else { 0.0 };
        let rel_tol = if sz.contains(&key) { 0.0 } else { rel };
        let w = want_grad(&key);
        if !sz.contains(&key) && t.dims() == w.dims() {
            worst_grad = worst_grad.max(errors(t, &w).0);
        }
        rep.check(&format!("{}: {key}", fx.name), t, &w, rel_tol, abs);
    }
    (worst_out, worst_grad)
}

fn to_f64(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).expect("f64")
}

/// Run one fixture at `dtype` and compare it against the stored float64 reference. Returns the
/// worst relative errors (outputs, gradients), structurally-zero gradients excluded.
fn check_fixture(rep: &mut Report, fx: &Fixture, e: &Entry, dtype: DType) -> (f64, f64) {
    let (rel, sz_abs) = if dtype == DType::F64 {
        (1e-10, 1e-12)
    } else {
        (e.f32_rel, 5e-5)
    };
    if dtype == DType::F32 && needs_valid_region(fx) {
        let Some(region) = e.valid_region else {
            rep.fail(format!(
                "{}: needs a valid-region function for float32",
                fx.name
            ));
            return (f64::NAN, f64::NAN);
        };
        let mfx = match masked_cotangents(fx, region) {
            Ok(f) => f,
            Err(err) => {
                rep.fail(format!("{}: {err}", fx.name));
                return (f64::NAN, f64::NAN);
            }
        };
        // Reference gradients: our own float64 run (checked against the fixture in the f64
        // test) with the masked cotangents; outputs: the fixture, in the valid region.
        let (got, reference) = match ((e.run)(&mfx, DType::F32), (e.run)(&mfx, DType::F64)) {
            (Ok(g), Ok(r)) => (g, r),
            (Err(err), _) | (_, Err(err)) => {
                rep.fail(format!("{}: {err}", fx.name));
                return (f64::NAN, f64::NAN);
            }
        };
        let masked = |name: &str, t: &Tensor| -> Tensor {
            let m = region(fx, name).expect("region");
            to_f64(t).broadcast_mul(&m).expect("mask")
        };
        let got_masked = Outcome {
            outputs: got
                .outputs
                .iter()
                .map(|(k, t)| (k.clone(), masked(k, t)))
                .collect(),
            grads: got.grads,
        };
        return compare_outcome(
            rep,
            fx,
            &got_masked,
            &|n| masked(n, &fx.get(&format!("output.{n}"))),
            &|k| {
                reference
                    .grads
                    .get(k)
                    .map(to_f64)
                    .unwrap_or_else(|| fx.get(k))
            },
            rel,
            sz_abs,
        );
    }
    match (e.run)(fx, dtype) {
        Ok(got) => compare_outcome(
            rep,
            fx,
            &got,
            &|n| fx.get(&format!("output.{n}")),
            &|k| fx.get(k),
            rel,
            sz_abs,
        ),
        Err(err) => {
            rep.fail(format!("{}: {err}", fx.name));
            (f64::NAN, f64::NAN)
        }
    }
}

/// Check fixtures at `dtype`, each dispatched by its class through the registry. A fixture of an
/// unregistered class is a failure.
fn check_fixtures(fixtures: impl IntoIterator<Item = Fixture>, dtype: DType) -> Report {
    check_fixtures_with(fixtures, dtype, REGISTRY)
}

fn check_fixtures_with(
    fixtures: impl IntoIterator<Item = Fixture>,
    dtype: DType,
    registry: &[Entry],
) -> Report {
    let mut rep = Report::default();
    for fx in fixtures {
        let class = fx.target();
        let Some(e) = registry.iter().find(|e| e.class == class) else {
            rep.fail(format!("{}: unregistered class `{class}`", fx.name));
            continue;
        };
        let before = rep.failures.len();
        let (wo, wg) = check_fixture(&mut rep, &fx, e, dtype);
        let status = if rep.failures.len() == before {
            "ok"
        } else {
            "FAILED"
        };
        println!(
            "{dtype:?} {} ({class}): {status}, worst rel outputs {wo:.2e} grads {wg:.2e}",
            fx.name
        );
    }
    rep
}

/// Every module fixture, dispatched through the registry.
fn run_all(dtype: DType) {
    let fixtures = fixtures_in("modules")
        .into_iter()
        .map(|p| Fixture::load(&p));
    check_fixtures(fixtures, dtype).assert_ok(&format!("golden modules {dtype:?}"));
}

#[test]
fn golden_modules_f64() {
    run_all(DType::F64);
}

#[test]
fn golden_modules_f32() {
    run_all(DType::F32);
}

/// The fixtures of every module with a hand-written backward, through that backward.
fn run_all_manual(dtype: DType) {
    let fixtures: Vec<Fixture> = fixtures_in("modules")
        .into_iter()
        .map(|p| Fixture::load(&p))
        .filter(|fx| MANUAL_REGISTRY.iter().any(|e| e.class == fx.target()))
        .collect();
    let classes: BTreeSet<String> = fixtures.iter().map(|f| f.target()).collect();
    for e in MANUAL_REGISTRY {
        assert!(
            classes.contains(e.class),
            "no fixture for manual {}",
            e.class
        );
    }
    check_fixtures_with(fixtures, dtype, MANUAL_REGISTRY)
        .assert_ok(&format!("golden modules, hand-written backward, {dtype:?}"));
}

#[test]
fn golden_modules_manual_f64() {
    run_all_manual(DType::F64);
}

#[test]
fn golden_modules_manual_f32() {
    run_all_manual(DType::F32);
}

/// Every parameter of every registered module gets a finite, non-zero gradient, except the
/// fixture-documented structurally-zero ones (which must be ~0).
#[test]
fn golden_gradient_flow() {
    gradient_flow(REGISTRY, 100);
}

/// [`golden_gradient_flow`] through the hand-written backward passes ([`MANUAL_REGISTRY`]).
#[test]
fn golden_gradient_flow_manual() {
    gradient_flow(MANUAL_REGISTRY, 50);
}

/// Runs the fixtures of `registry`'s classes in f64 and checks that every parameter gradient is
/// finite and non-zero (structurally-zero ones ~0); at least `min_checked` of them.
fn gradient_flow(registry: &[Entry], min_checked: usize) {
    let mut failures = Vec::new();
    let mut checked = 0;
    for path in fixtures_in("modules") {
        let fx = Fixture::load(&path);
        let Some(e) = registry.iter().find(|e| e.class == fx.target()) else {
            continue;
        };
        let sz = fx.structurally_zero();
        let got = (e.run)(&fx, DType::F64).unwrap_or_else(|err| panic!("{}: {err}", fx.name));
        for (name, g) in &got.grads {
            if !name.starts_with("grad.param.") {
                continue;
            }
            checked += 1;
            let v: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            let max = v.iter().fold(0.0f64, |a, x| a.max(x.abs()));
            if v.iter().any(|x| !x.is_finite()) {
                failures.push(format!("{}: {name} not finite", fx.name));
            } else if sz.contains(name) {
                if max > 1e-12 {
                    failures.push(format!(
                        "{}: {name} should be structurally zero, max {max:e}",
                        fx.name
                    ));
                }
            } else if max == 0.0 {
                failures.push(format!("{}: {name} is zero", fx.name));
            }
        }
    }
    assert!(
        checked > min_checked,
        "only {checked} parameter gradients checked"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Registry classes are unique and each has a fixture; every fixture's class is registered.
#[test]
fn golden_registry_is_consistent() {
    let classes: BTreeSet<String> = fixtures_in("modules")
        .iter()
        .map(|p| Fixture::load(p).target())
        .collect();
    let registered: BTreeSet<&str> = REGISTRY.iter().map(|e| e.class).collect();
    assert_eq!(registered.len(), REGISTRY.len(), "duplicate registry class");
    for e in REGISTRY {
        assert!(
            classes.contains(e.class),
            "no fixture for registered class {}",
            e.class
        );
    }
    for c in &classes {
        assert!(registered.contains(c.as_str()), "unregistered class {c}");
    }
}

/// A fixture of an unknown class is reported as a failure, not skipped.
#[test]
fn golden_unknown_class_fails() {
    let mut fx = Fixture::named("modules", "distogram_head");
    fx.meta["openfold_class"] = "openfold.model.heads.NoSuchHead".into();
    let rep = check_fixtures([fx], DType::F64);
    assert_eq!(rep.failures.len(), 1, "{:?}", rep.failures);
    assert!(rep.failures[0].contains("unregistered class `NoSuchHead`"));
}
