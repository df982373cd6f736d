//! The structure module (AF2 supplement Algorithm 20) with its sub-modules: the transition
//! (lines 8–9), BackboneUpdate (Algorithm 23), the angle ResNet (lines 11–14), torsion angles →
//! rigid-group frames (Algorithm 24) and atom14 positions from literature coordinates.
//!
//! Parameter names are OpenFold's `StructureModule` state-dict names. Conventions follow OpenFold
//! (monomer): the rigids are kept as quaternion + translation in nm, composed with Algorithm 23 and
//! renormalised; outputs scale translations by `trans_scale_factor` (10 → Å); the rotation gradient
//! is stopped between layers.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::StructureConfig;
use crate::error::{Error, Result};
use crate::geometry::rigid::{QuatRigid, Rigid};
use crate::model::ipa::{arg_f64, arg_usize, InvariantPointAttention, IpaConfig};
use crate::model::primitives::{cast, LayerNorm, Linear, LinearInit};
use crate::model::residue_constants as rc;
use crate::train::seed::splitmix64;

/// Residue-constant tables the structure module needs (OpenFold keeps them as float32 buffers and
/// casts them to the activation dtype; we do the same).
#[derive(Debug, Clone)]
pub struct AtomTables {
    /// `[21, 8, 4, 4]` default frame of each rigid group relative to its parent.
    pub default_frames: Tensor,
    /// `[21, 14]` (u32) rigid group of each atom14 slot.
    pub group_idx: Tensor,
    /// `[21, 14]` 1 where the atom14 slot exists.
    pub atom_mask: Tensor,
    /// `[21, 14, 3]` literature position of each atom in its rigid group's frame.
    pub lit_positions: Tensor,
}

impl AtomTables {
    /// The AF2 tables from [`crate::model::residue_constants`] (float32, as OpenFold's buffers).
    pub fn new(device: &Device) -> Result<Self> {
        let df: Vec<f32> = rc::restype_rigid_group_default_frame()
            .iter()
            .flatten()
            .flatten()
            .flatten()
            .copied()
            .collect();
        let gi: Vec<u32> = rc::restype_atom14_to_rigid_group()
            .iter()
            .flatten()
            .map(|&g| g as u32)
            .collect();
        let am: Vec<f32> = rc::restype_atom14_mask()
            .iter()
            .flatten()
            .copied()
            .collect();
        let lp: Vec<f32> = rc::restype_atom14_rigid_group_positions()
            .iter()
            .flatten()
            .flatten()
            .copied()
            .collect();
        let n = rc::RESTYPE_NUM_WITH_X;
        Self::from_tensors(
            Tensor::from_vec(df, (n, rc::RIGID_GROUP_NUM, 4, 4), device)?,
            Tensor::from_vec(gi, (n, rc::ATOM14_NUM), device)?,
            Tensor::from_vec(am, (n, rc::ATOM14_NUM), device)?,
            Tensor::from_vec(lp, (n, rc::ATOM14_NUM, 3), device)?,
        )
    }

    /// From tensors with the shapes documented on the fields (any float dtype; integer
    /// `group_idx`).
    pub fn from_tensors(
        default_frames: Tensor,
        group_idx: Tensor,
        atom_mask: Tensor,
        lit_positions: Tensor,
    ) -> Result<Self> {
        let ok = default_frames.dims() == [21, 8, 4, 4]
            && group_idx.dims() == [21, 14]
            && atom_mask.dims() == [21, 14]
            && lit_positions.dims() == [21, 14, 3];
        if !ok {
            return Err(Error::Model(format!(
                "AtomTables: unexpected shapes {:?} {:?} {:?} {:?}",
                default_frames.dims(),
                group_idx.dims(),
                atom_mask.dims(),
                lit_positions.dims()
            )));
        }
        Ok(Self {
            default_frames,
            group_idx: group_idx.to_dtype(DType::U32)?,
            atom_mask,
            lit_positions,
        })
    }

    /// Move to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            default_frames: self.default_frames.to_device(device)?,
            group_idx: self.group_idx.to_device(device)?,
            atom_mask: self.atom_mask.to_device(device)?,
            lit_positions: self.lit_positions.to_device(device)?,
        })
    }
}

/// Rows of `table` `[21, ...]` for each residue type in `aatype` `[*]` → `[*, ...]`.
fn lookup(table: &Tensor, aatype: &Tensor) -> Result<Tensor> {
    let idx = aatype.flatten_all()?.to_dtype(DType::U32)?;
    let rows = table.index_select(&idx, 0)?;
    let mut shape = aatype.dims().to_vec();
    shape.extend_from_slice(&table.dims()[1..]);
    Ok(rows.reshape(shape)?)
}

/// Algorithm 24 (`torsion_angles_to_frames`): per-residue rigid-group frames in the global frame.
///
/// `backb_to_global` has batch shape `[*, N]`, `alpha` is `[*, N, 7, 2]` (sin, cos) and `aatype`
/// `[*, N]`. Returns a rigid with batch shape `[*, N, 8]`.
pub fn torsion_angles_to_frames(
    backb_to_global: &Rigid,
    alpha: &Tensor,
    aatype: &Tensor,
    tables: &AtomTables,
) -> Result<Rigid> {
    let dt = alpha.dtype();
    let default = Rigid::from_tensor_4x4(&lookup(&cast(&tables.default_frames, dt)?, aatype)?)?;
    // Prepend the backbone "angle" (sin 0, cos 1): [*, N, 8, 2].
    let mut bb_shape = alpha.dims().to_vec();
    let r = bb_shape.len();
    bb_shape[r - 2] = 1;
    bb_shape[r - 1] = 1;
    let zeros = Tensor::zeros(bb_shape.as_slice(), dt, alpha.device())?;
    let ones = Tensor::ones(bb_shape.as_slice(), dt, alpha.device())?;
    let bb = Tensor::cat(&[&zeros, &ones], D::Minus1)?;
    let alpha = Tensor::cat(&[&bb, alpha], D::Minus2)?;
    let sin = alpha.narrow(D::Minus1, 0, 1)?; // [*, N, 8, 1]
    let cos = alpha.narrow(D::Minus1, 1, 1)?;
    let z = sin.zeros_like()?;
    let o = sin.ones_like()?;
    // Rotation about x by the torsion angle: [[1,0,0],[0,c,−s],[0,s,c]].
    let e = [&o, &z, &z, &z, &cos, &sin.neg()?, &z, &sin, &cos];
    let flat = Tensor::cat(&e, D::Minus1)?;
    let mut rshape = flat.dims().to_vec();
    rshape.pop();
    rshape.extend([3, 3]);
    let rots = flat.reshape(rshape)?;
    let frames = default.compose_rot(&rots)?; // [*, N, 8]: group frame → parent frame
                                              // Chain chi2..chi4 onto chi1 (each is relative to the previous chi frame).
    let g = frames.batch_shape().len() - 1;
    let chi1 = frames.narrow(g, 4, 1)?;
    let chi2 = chi1.compose(&frames.narrow(g, 5, 1)?)?;
    let chi3 = chi2.compose(&frames.narrow(g, 6, 1)?)?;
    let chi4 = chi3.compose(&frames.narrow(g, 7, 1)?)?;
    let to_bb = Rigid::cat(&[frames.narrow(g, 0, 5)?, chi2, chi3, chi4], g)?;
    backb_to_global.unsqueeze(g)?.compose(&to_bb)
}

/// Atom14 positions `[*, N, 14, 3]` from the rigid-group frames `[*, N, 8]` (global) and the
/// literature positions; absent atoms are zero.
pub fn frames_and_literature_positions_to_atom14_pos(
    frames: &Rigid,
    aatype: &Tensor,
    tables: &AtomTables,
) -> Result<Tensor> {
    let dt = frames.trans.dtype();
    let group = lookup(&tables.group_idx, aatype)?; // [*, N, 14] u32
    let mask = lookup(&cast(&tables.atom_mask, dt)?, aatype)?.unsqueeze(D::Minus1)?; // [*, N, 14, 1]
    let lit = lookup(&cast(&tables.lit_positions, dt)?, aatype)?; // [*, N, 14, 3]
                                                                  // Gather each atom's group frame along the group dim.
    let mut shape_r = group.dims().to_vec();
    shape_r.extend([3, 3]);
    let g_r = group
        .unsqueeze(D::Minus1)?
        .unsqueeze(D::Minus1)?
        .broadcast_as(shape_r)?
        .contiguous()?;
    let mut shape_t = group.dims().to_vec();
    shape_t.push(3);
    let g_t = group
        .unsqueeze(D::Minus1)?
        .broadcast_as(shape_t)?
        .contiguous()?;
    let gdim = group.rank() - 1;
    let rots = frames.rots.contiguous()?.gather(&g_r, gdim)?;
    let trans = frames.trans.contiguous()?.gather(&g_t, gdim)?;
    let atom_frames = Rigid::new(rots, trans)?;
    Ok(atom_frames.apply(&lit)?.broadcast_mul(&mask)?)
}

/// Elementwise dropout with a deterministic counter-based mask (kept entries scaled by
/// `1/(1−rate)`), as OpenFold's plain `nn.Dropout` in the structure module.
pub fn dropout(x: &Tensor, rate: f64, seed: u64) -> Result<Tensor> {
    if rate <= 0.0 {
        return Ok(x.clone());
    }
    // CUDA-graph mode: the mask comes from the installed device pool (no host upload).
    if let Some(m) = super::dropout_pool::pool_mask(seed, x.dims(), rate, x.dtype())? {
        return Ok((x * m)?);
    }
    let n = x.elem_count();
    let keep = 1.0 - rate;
    let mut v = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let u = (splitmix64(seed ^ splitmix64(i)) >> 11) as f64 / (1u64 << 53) as f64;
        v.push(if u < keep { 1.0 / keep } else { 0.0 });
    }
    let m = Tensor::from_vec(v, x.dims(), &Device::Cpu)?
        .to_dtype(x.dtype())?
        .to_device(x.device())?;
    Ok((x * m)?)
}

/// One residual layer of the structure-module transition (Algorithm 20 line 8).
#[derive(Debug, Clone)]
pub struct StructureModuleTransitionLayer {
    pub linear_1: Linear,
    pub linear_2: Linear,
    pub linear_3: Linear,
}

impl StructureModuleTransitionLayer {
    pub fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), c, c, true, LinearInit::Relu)?,
            linear_2: Linear::new(vb.pp("linear_2"), c, c, true, LinearInit::Relu)?,
            linear_3: Linear::new(vb.pp("linear_3"), c, c, true, LinearInit::Final)?,
        })
    }

    pub fn forward(&self, s: &Tensor) -> Result<Tensor> {
        let x = self.linear_1.forward(s)?.relu()?;
        let x = self.linear_2.forward(&x)?.relu()?;
        let x = self.linear_3.forward(&x)?;
        Ok((x + s)?)
    }
}

/// Algorithm 20 lines 8–9: residual MLP layers, dropout, LayerNorm.
#[derive(Debug, Clone)]
pub struct StructureModuleTransition {
    pub layers: Vec<StructureModuleTransitionLayer>,
    pub layer_norm: LayerNorm,
    pub dropout_rate: f64,
}

impl StructureModuleTransition {
    pub fn new(vb: VarBuilder, c: usize, num_layers: usize, dropout_rate: f64) -> Result<Self> {
        let layers = (0..num_layers)
            .map(|i| StructureModuleTransitionLayer::new(vb.pp(format!("layers.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            layer_norm: LayerNorm::new(vb.pp("layer_norm"), c)?,
            dropout_rate,
        })
    }

    /// `dropout_seed`: `None` in eval.
    pub fn forward(&self, s: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let mut s = s.clone();
        for l in &self.layers {
            s = l.forward(&s)?;
        }
        if let Some(seed) = dropout_seed {
            s = dropout(&s, self.dropout_rate, seed)?;
        }
        self.layer_norm.forward(&s)
    }
}

/// Algorithm 23 (BackboneUpdate): `s` → `(b, c, d, tx, ty, tz)`.
#[derive(Debug, Clone)]
pub struct BackboneUpdate {
    pub linear: Linear,
}

impl BackboneUpdate {
    pub fn new(vb: VarBuilder, c_s: usize) -> Result<Self> {
        Ok(Self {
            linear: Linear::new(vb.pp("linear"), c_s, 6, true, LinearInit::Final)?,
        })
    }

    pub fn forward(&self, s: &Tensor) -> Result<Tensor> {
        self.linear.forward(s)
    }
}

/// One block of the angle ResNet (Algorithm 20 lines 12–13).
#[derive(Debug, Clone)]
pub struct AngleResnetBlock {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl AngleResnetBlock {
    pub fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), c, c, true, LinearInit::Relu)?,
            linear_2: Linear::new(vb.pp("linear_2"), c, c, true, LinearInit::Final)?,
        })
    }

    pub fn forward(&self, a: &Tensor) -> Result<Tensor> {
        let x = self.linear_1.forward(&a.relu()?)?.relu()?;
        let x = self.linear_2.forward(&x)?;
        Ok((x + a)?)
    }
}

/// Algorithm 20 lines 11–14: torsion angles from the current and initial single representation.
#[derive(Debug, Clone)]
pub struct AngleResnet {
    pub linear_in: Linear,
    pub linear_initial: Linear,
    pub layers: Vec<AngleResnetBlock>,
    pub linear_out: Linear,
    pub no_angles: usize,
    pub eps: f64,
}

impl AngleResnet {
    pub fn new(
        vb: VarBuilder,
        c_s: usize,
        c_hidden: usize,
        no_blocks: usize,
        no_angles: usize,
        eps: f64,
    ) -> Result<Self> {
        let layers = (0..no_blocks)
            .map(|i| AngleResnetBlock::new(vb.pp(format!("layers.{i}")), c_hidden))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            linear_in: Linear::new(vb.pp("linear_in"), c_s, c_hidden, true, LinearInit::Default)?,
            linear_initial: Linear::new(
                vb.pp("linear_initial"),
                c_s,
                c_hidden,
                true,
                LinearInit::Default,
            )?,
            layers,
            linear_out: Linear::new(
                vb.pp("linear_out"),
                c_hidden,
                no_angles * 2,
                true,
                LinearInit::Default,
            )?,
            no_angles,
            eps,
        })
    }

    /// Returns `(unnormalized, normalized)` angles, each `[*, N, no_angles, 2]` (sin, cos).
    pub fn forward(&self, s: &Tensor, s_initial: &Tensor) -> Result<(Tensor, Tensor)> {
        let init = self.linear_initial.forward(&s_initial.relu()?)?;
        let mut a = (self.linear_in.forward(&s.relu()?)? + init)?;
        for l in &self.layers {
            a = l.forward(&a)?;
        }
        let a = self.linear_out.forward(&a.relu()?)?;
        let mut shape = a.dims().to_vec();
        shape.pop();
        shape.extend([self.no_angles, 2]);
        let un = a.reshape(shape)?;
        let denom = un
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .clamp(self.eps, f64::INFINITY)?
            .sqrt()?;
        let ang = un.broadcast_div(&denom)?;
        Ok((un, ang))
    }
}

/// Outputs of every layer, stacked on a leading `[no_blocks]` dim (OpenFold's `outputs["sm"]`).
#[derive(Debug, Clone)]
pub struct StructureModuleOutput {
    /// `[L, *, N, 7]` = (quaternion w,x,y,z, translation in Å).
    pub frames: Tensor,
    /// `[L, *, N, 8, 4, 4]` rigid-group frames in the global frame (Å).
    pub sidechain_frames: Tensor,
    /// `[L, *, N, 7, 2]`
    pub unnormalized_angles: Tensor,
    /// `[L, *, N, 7, 2]`
    pub angles: Tensor,
    /// `[L, *, N, 14, 3]` atom14 positions in Å.
    pub positions: Tensor,
    /// `[L, *, N, c_s]` single representation after each layer's transition.
    pub states: Tensor,
    /// `[*, N, c_s]` final single representation.
    pub single: Tensor,
}

/// Algorithm 20: the structure module.
#[derive(Debug, Clone)]
pub struct StructureModule {
    pub cfg: StructureConfig,
    pub layer_norm_s: LayerNorm,
    pub layer_norm_z: LayerNorm,
    pub linear_in: Linear,
    pub ipa: InvariantPointAttention,
    pub layer_norm_ipa: LayerNorm,
    pub transition: StructureModuleTransition,
    pub bb_update: BackboneUpdate,
    pub angle_resnet: AngleResnet,
    pub tables: AtomTables,
}

impl StructureModule {
    /// With the AF2 residue-constant tables ([`AtomTables::new`]).
    pub fn new(vb: VarBuilder, c_s: usize, c_z: usize, cfg: &StructureConfig) -> Result<Self> {
        let tables = AtomTables::new(vb.device())?;
        Self::with_tables(vb, c_s, c_z, cfg, tables)
    }

    /// From OpenFold `StructureModule` constructor arguments (JSON object; `is_multimer` must be
    /// false or absent).
    pub fn from_constructor_args(vb: VarBuilder, args: &serde_json::Value) -> Result<Self> {
        if args["is_multimer"].as_bool() == Some(true) {
            return Err(Error::Model(
                "multimer structure module is not supported".into(),
            ));
        }
        let cfg = StructureConfig {
            c_ipa: arg_usize(args, "c_ipa")?,
            c_resnet: arg_usize(args, "c_resnet")?,
            no_heads_ipa: arg_usize(args, "no_heads_ipa")?,
            no_qk_points: arg_usize(args, "no_qk_points")?,
            no_v_points: arg_usize(args, "no_v_points")?,
            dropout_rate: arg_f64(args, "dropout_rate")?,
            no_blocks: arg_usize(args, "no_blocks")?,
            no_transition_layers: arg_usize(args, "no_transition_layers")?,
            no_resnet_blocks: arg_usize(args, "no_resnet_blocks")?,
            no_angles: arg_usize(args, "no_angles")?,
            trans_scale_factor: arg_f64(args, "trans_scale_factor")?,
            epsilon: arg_f64(args, "epsilon")?,
            inf: arg_f64(args, "inf")?,
        };
        Self::new(vb, arg_usize(args, "c_s")?, arg_usize(args, "c_z")?, &cfg)
    }

    /// With explicit residue-constant tables.
    pub fn with_tables(
        vb: VarBuilder,
        c_s: usize,
        c_z: usize,
        cfg: &StructureConfig,
        tables: AtomTables,
    ) -> Result<Self> {
        Ok(Self {
            cfg: cfg.clone(),
            layer_norm_s: LayerNorm::new(vb.pp("layer_norm_s"), c_s)?,
            layer_norm_z: LayerNorm::new(vb.pp("layer_norm_z"), c_z)?,
            linear_in: Linear::new(vb.pp("linear_in"), c_s, c_s, true, LinearInit::Default)?,
            ipa: InvariantPointAttention::new(
                vb.pp("ipa"),
                &IpaConfig::from_structure(cfg, c_s, c_z),
            )?,
            layer_norm_ipa: LayerNorm::new(vb.pp("layer_norm_ipa"), c_s)?,
            transition: StructureModuleTransition::new(
                vb.pp("transition"),
                c_s,
                cfg.no_transition_layers,
                cfg.dropout_rate,
            )?,
            bb_update: BackboneUpdate::new(vb.pp("bb_update"), c_s)?,
            angle_resnet: AngleResnet::new(
                vb.pp("angle_resnet"),
                c_s,
                cfg.c_resnet,
                cfg.no_resnet_blocks,
                cfg.no_angles,
                cfg.epsilon,
            )?,
            tables: tables.to_device(vb.device())?,
        })
    }

    /// `single` `[*, N, c_s]`, `pair` `[*, N, N, c_z]`, `aatype` `[*, N]` (integer), `mask`
    /// `[*, N]` (1 = residue present). `dropout_seed`: `None` = eval (dropout off); `Some(seed)`
    /// = training dropout with masks derived deterministically from the seed.
    pub fn forward(
        &self,
        single: &Tensor,
        pair: &Tensor,
        aatype: &Tensor,
        mask: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<StructureModuleOutput> {
        let cfg = &self.cfg;
        // DISCREPANCY: OpenFold keeps only the rigids in f32 under half precision; we run the
        // whole structure module in f32 for bf16/f16 input (outputs are f32).
        let dt = match single.dtype() {
            DType::BF16 | DType::F16 => DType::F32,
            d => d,
        };
        let s = self.layer_norm_s.forward(&cast(single, dt)?)?;
        let z = self.layer_norm_z.forward(&cast(pair, dt)?)?;
        let aatype = aatype.to_device(s.device())?;
        let s_initial = s.clone();
        let mut s = self.linear_in.forward(&s)?;
        let dims = s.dims().to_vec();
        let batch = &dims[..dims.len() - 1]; // [*, N]
        let mut rigids = QuatRigid::identity(batch, dt, s.device())?;
        // Distinct dropout streams per (layer, site).
        let seed = |layer: usize, site: u64| {
            dropout_seed.map(|sd| splitmix64(sd ^ splitmix64(layer as u64 * 16 + site)))
        };

        let mut outs: [Vec<Tensor>; 6] = Default::default();
        for layer in 0..cfg.no_blocks {
            // Algorithm 20 lines 6–7: IPA, residual, dropout, LayerNorm.
            let r = rigids.to_rigid()?;
            s = (&s + self.ipa.forward(&s, &z, &r, mask)?)?;
            if let Some(sd) = seed(layer, 1) {
                s = dropout(&s, cfg.dropout_rate, sd)?;
            }
            s = self.layer_norm_ipa.forward(&s)?;
            // Lines 8–9: transition.
            s = self.transition.forward(&s, seed(layer, 2))?;
            // Line 10: backbone update (Algorithm 23).
            rigids = rigids.compose_q_update_vec(&self.bb_update.forward(&s)?)?;
            let backb_to_global = rigids
                .to_rigid()?
                .scale_translation(cfg.trans_scale_factor)?;
            // Lines 11–14: torsion angles.
            let (un, ang) = self.angle_resnet.forward(&s, &s_initial)?;
            // Algorithm 24 and atom14 positions.
            let all_frames =
                torsion_angles_to_frames(&backb_to_global, &ang, &aatype, &self.tables)?;
            let pos =
                frames_and_literature_positions_to_atom14_pos(&all_frames, &aatype, &self.tables)?;
            outs[0].push(
                rigids
                    .scale_translation(cfg.trans_scale_factor)?
                    .to_tensor_7()?,
            );
            outs[1].push(all_frames.to_tensor_4x4()?);
            outs[2].push(un);
            outs[3].push(ang);
            outs[4].push(pos);
            outs[5].push(s.clone());
            // Line 20: stop the rotation gradient between layers.
            rigids = rigids.stop_rot_gradient();
        }
        let st = |v: &Vec<Tensor>| -> Result<Tensor> { Ok(Tensor::stack(v, 0)?) };
        Ok(StructureModuleOutput {
            frames: st(&outs[0])?,
            sidechain_frames: st(&outs[1])?,
            unnormalized_angles: st(&outs[2])?,
            angles: st(&outs[3])?,
            positions: st(&outs[4])?,
            states: st(&outs[5])?,
            single: s,
        })
    }
}
