//! Seeded, pure MSA transforms and the sample builder (AF2 suppl. section 1.2.5–1.2.9, OpenFold
//! `data_transforms` train-mode order): block deletion (Algorithm 1), cluster sampling, BERT-style
//! masking, nearest-neighbour cluster assignment and cluster profiles (1.2.7), extra-MSA selection,
//! `msa_feat` / `target_feat`, contiguous crop, padding to fixed shapes; everything resampled per
//! recycling iteration, the crop shared by all recycles.
//!
//! All functions take plain slices and an explicit [`Rng`]; nothing touches global state.

use std::collections::BTreeMap;

use super::alphabet::hhblits_to_aatype;
use super::features;
use super::msa::Msa;
use super::rng::{Purpose, Rng};
use super::sample::{Array, Sample};
use crate::config::{BlockDeleteMode, Config};
use crate::error::{Error, Result};

/// Token of the BERT mask in `msa_feat`'s 23-way one-hot.
pub const MASK_TOKEN: u8 = 22;
/// Gap token in aatype order.
pub const GAP_TOKEN: u8 = 21;

/// Full-length inputs of one chain (what the HDF5 cache stores).
#[derive(Debug, Clone, PartialEq)]
pub struct ProteinInput {
    /// Chain id, e.g. `4zey_A`.
    pub id: String,
    /// aatype per residue (0..=20).
    pub aatype: Vec<u8>,
    /// atom37 positions `[L,37,3]` and mask `[L,37]`.
    pub positions: Vec<f32>,
    pub mask: Vec<f32>,
    /// Resolution in Å (0 when unknown, as OpenFold).
    pub resolution: f32,
    /// Merged, de-duplicated MSA in HHblits tokens, query first.
    pub msa: Msa,
}

impl ProteinInput {
    pub fn len(&self) -> usize {
        self.aatype.len()
    }

    pub fn is_empty(&self) -> bool {
        self.aatype.is_empty()
    }

    /// Check internal consistency (shapes, MSA width, query = sequence).
    pub fn validate(&self) -> Result<()> {
        let l = self.len();
        let bad = |msg: String| Error::Data {
            what: self.id.clone(),
            msg,
        };
        if l == 0 {
            return Err(bad("empty chain".into()));
        }
        if self.positions.len() != l * 111 || self.mask.len() != l * 37 {
            return Err(bad(
                "positions/mask shape does not match the sequence".into()
            ));
        }
        if self.msa.rows == 0 || self.msa.width != l {
            return Err(bad(format!(
                "MSA width {} != chain length {l}",
                self.msa.width
            )));
        }
        if self.msa.tokens.len() != self.msa.rows * l
            || self.msa.deletions.len() != self.msa.rows * l
        {
            return Err(bad("MSA arrays have the wrong size".into()));
        }
        Ok(())
    }
}

/// Everything [`build_sample`] needs from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureConfig {
    pub crop_size: usize,
    pub max_msa_clusters: usize,
    pub max_extra_msa: usize,
    pub replace_fraction: f32,
    pub uniform_prob: f32,
    pub profile_prob: f32,
    pub same_prob: f32,
    pub block_delete: bool,
    pub msa_fraction_per_block: f64,
    pub num_blocks: usize,
    /// Number of recycling copies (max recycling iterations + 1).
    pub num_recycles: usize,
    /// Probability that a sample uses clamped FAPE.
    pub clamp_prob: f64,
    /// Base seed of every random stream.
    pub seed: u64,
}

impl FeatureConfig {
    /// From the resolved run configuration.
    pub fn from_config(cfg: &Config) -> FeatureConfig {
        let d = &cfg.data;
        FeatureConfig {
            crop_size: d.crop_size,
            max_msa_clusters: d.max_msa_clusters,
            max_extra_msa: d.max_extra_msa,
            replace_fraction: d.masked_msa.replace_fraction as f32,
            uniform_prob: d.masked_msa.uniform_prob as f32,
            profile_prob: d.masked_msa.profile_prob as f32,
            same_prob: d.masked_msa.same_prob as f32,
            block_delete: d.block_delete.mode == BlockDeleteMode::On,
            msa_fraction_per_block: d.block_delete.msa_fraction_per_block,
            num_blocks: d.block_delete.num_blocks,
            num_recycles: cfg.model.recycling.max_iters + 1,
            clamp_prob: cfg.loss.fape.clamp_prob,
            seed: cfg.train.seed,
        }
    }
}

/// Algorithm 1 (MSABlockDeletion): remove `num_blocks` blocks of `floor(N·fraction)` consecutive
/// rows starting at uniform positions; the query (row 0) is always kept. Returns kept row indices.
// DISCREPANCY: OpenFold draws block starts in [0, N) and keeps row 0 through a set difference;
// AF2's Algorithm 1 draws starts among the non-query rows. We follow Algorithm 1.
pub fn block_delete(n_rows: usize, fraction: f64, num_blocks: usize, rng: &mut Rng) -> Vec<usize> {
    let block = (n_rows as f64 * fraction) as usize;
    let mut deleted = vec![false; n_rows];
    if n_rows > 1 && block > 0 {
        for _ in 0..num_blocks {
            let start = 1 + rng.below(n_rows as u64 - 1) as usize;
            for d in deleted.iter_mut().skip(start).take(block) {
                *d = true;
            }
        }
    }
    (0..n_rows).filter(|&i| i == 0 || !deleted[i]).collect()
}

/// `sample_msa`: the query, then the other rows in random order; the first `max_clusters` are the
/// cluster centres, the rest the extra MSA.
pub fn sample_clusters(
    rows: &[usize],
    max_clusters: usize,
    rng: &mut Rng,
) -> (Vec<usize>, Vec<usize>) {
    if rows.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let mut rest: Vec<usize> = rows[1..].to_vec();
    rng.shuffle(&mut rest);
    let mut order = Vec::with_capacity(rows.len());
    order.push(rows[0]);
    order.extend(rest);
    let n = max_clusters.min(order.len()).max(1);
    let extra = order.split_off(n);
    (order, extra)
}

/// HHblits profile in aatype order: per column, the frequency of each of the 22 tokens over all
/// rows (`make_hhblits_profile`), `[L,22]`.
pub fn msa_profile(tokens: &[u8], rows: usize, width: usize) -> Vec<f32> {
    let mut counts = vec![0u32; width * 22];
    for r in 0..rows {
        for (j, &t) in tokens[r * width..(r + 1) * width].iter().enumerate() {
            counts[j * 22 + (t as usize).min(21)] += 1;
        }
    }
    let inv = 1.0 / rows.max(1) as f32;
    counts.iter().map(|&c| c as f32 * inv).collect()
}

/// BERT-style masking (`make_masked_msa`, suppl. 1.2.7): each position is selected with
/// probability `replace_fraction`; a selected token becomes a uniform amino acid (`uniform_prob`),
/// a draw from the column profile (`profile_prob`), itself (`same_prob`) or the mask token 22
/// (the rest). Returns (masked tokens, bert_mask). `tokens` are aatype order, `[S,L]`.
pub fn mask_msa(
    tokens: &[u8],
    width: usize,
    profile: &[f32],
    cfg: &FeatureConfig,
    rng: &mut Rng,
) -> (Vec<u8>, Vec<f32>) {
    let mask_prob = (1.0 - cfg.uniform_prob - cfg.profile_prob - cfg.same_prob).max(0.0);
    let mut out = tokens.to_vec();
    let mut bert = vec![0f32; tokens.len()];
    let mut probs = [0f32; 23];
    for (k, &t) in tokens.iter().enumerate() {
        if rng.next_f32() >= cfg.replace_fraction {
            continue;
        }
        bert[k] = 1.0;
        let j = k % width;
        for (a, p) in probs.iter_mut().enumerate().take(22) {
            let uniform = if a < 20 { 0.05 } else { 0.0 };
            *p = cfg.uniform_prob * uniform + cfg.profile_prob * profile[j * 22 + a];
        }
        if (t as usize) < 22 {
            probs[t as usize] += cfg.same_prob;
        }
        probs[22] = mask_prob;
        out[k] = rng.categorical(&probs) as u8;
    }
    (out, bert)
}

/// Number of positions where `a` and `b` hold the same byte (SIMD-friendly: 32-lane u8
/// accumulators, flushed before they can overflow).
pub fn count_equal(a: &[u8], b: &[u8]) -> u32 {
    const W: usize = 32;
    let n = a.len().min(b.len());
    let full = n / W * W;
    let mut total = 0u32;
    let mut acc = [0u8; W];
    for (blk, (ca, cb)) in a[..full]
        .chunks_exact(W)
        .zip(b[..full].chunks_exact(W))
        .enumerate()
    {
        for i in 0..W {
            acc[i] += u8::from(ca[i] == cb[i]);
        }
        if blk % 255 == 254 {
            total += acc.iter().map(|&x| u32::from(x)).sum::<u32>();
            acc = [0; W];
        }
    }
    total += acc.iter().map(|&x| u32::from(x)).sum::<u32>();
    total
        + a[full..n]
            .iter()
            .zip(&b[full..n])
            .filter(|(x, y)| x == y)
            .count() as u32
}

/// `nearest_neighbor_clusters`: each extra row goes to the cluster centre with which it agrees on
/// the most columns (agreement counted on amino-acid tokens 0..=20 of the centre; gaps and mask
/// tokens count 0); ties go to the first centre.
pub fn assign_clusters(
    centres: &[u8],
    n_centres: usize,
    extra: &[u8],
    n_extra: usize,
    width: usize,
) -> Vec<usize> {
    // Centre tokens that can never agree (gap, mask) become 255.
    let c: Vec<u8> = centres
        .iter()
        .map(|&t| if t > 20 { 255 } else { t })
        .collect();
    (0..n_extra)
        .map(|e| {
            let row = &extra[e * width..(e + 1) * width];
            let mut best = 0usize;
            let mut best_n = -1i64;
            for k in 0..n_centres {
                let cr = &c[k * width..(k + 1) * width];
                let n = count_equal(row, cr) as i64;
                if n > best_n {
                    best_n = n;
                    best = k;
                }
            }
            best
        })
        .collect()
}

/// Recycle-last, padded MSA feature buffers (`[..., R]`), written in place by each recycle.
struct StackedMsa {
    r: usize,
    n: usize,
    sc: usize,
    se: usize,
    msa_feat: Vec<f32>,
    true_msa: Vec<i64>,
    bert_mask: Vec<f32>,
    msa_mask: Vec<f32>,
    msa_row_mask: Vec<f32>,
    extra_msa: Vec<i64>,
    extra_has_deletion: Vec<f32>,
    extra_deletion_value: Vec<f32>,
    extra_msa_mask: Vec<f32>,
    extra_msa_row_mask: Vec<f32>,
}

impl StackedMsa {
    fn new(r: usize, n: usize, sc: usize, se: usize) -> StackedMsa {
        StackedMsa {
            r,
            n,
            sc,
            se,
            msa_feat: vec![0.0; sc * n * 49 * r],
            true_msa: vec![0; sc * n * r],
            bert_mask: vec![0.0; sc * n * r],
            msa_mask: vec![0.0; sc * n * r],
            msa_row_mask: vec![0.0; sc * r],
            extra_msa: vec![0; se * n * r],
            extra_has_deletion: vec![0.0; se * n * r],
            extra_deletion_value: vec![0.0; se * n * r],
            extra_msa_mask: vec![0.0; se * n * r],
            extra_msa_row_mask: vec![0.0; se * r],
        }
    }

    fn into_features(self, out: &mut BTreeMap<String, Array>) {
        let (r, n, sc, se) = (self.r, self.n, self.sc, self.se);
        out.insert(
            "msa_feat".into(),
            Array::f32(&[sc, n, 49, r], self.msa_feat),
        );
        out.insert("true_msa".into(), Array::i64(&[sc, n, r], self.true_msa));
        out.insert("bert_mask".into(), Array::f32(&[sc, n, r], self.bert_mask));
        out.insert("msa_mask".into(), Array::f32(&[sc, n, r], self.msa_mask));
        out.insert(
            "msa_row_mask".into(),
            Array::f32(&[sc, r], self.msa_row_mask),
        );
        out.insert("extra_msa".into(), Array::i64(&[se, n, r], self.extra_msa));
        out.insert(
            "extra_has_deletion".into(),
            Array::f32(&[se, n, r], self.extra_has_deletion),
        );
        out.insert(
            "extra_deletion_value".into(),
            Array::f32(&[se, n, r], self.extra_deletion_value),
        );
        out.insert(
            "extra_msa_mask".into(),
            Array::f32(&[se, n, r], self.extra_msa_mask),
        );
        out.insert(
            "extra_msa_row_mask".into(),
            Array::f32(&[se, r], self.extra_msa_row_mask),
        );
    }
}

fn del_value(d: f32) -> f32 {
    (d / 3.0).atan() * (2.0 / std::f32::consts::PI)
}

/// One recycle (`rc`) of MSA processing (block deletion → cluster sampling → masking →
/// clustering → cluster summaries → extra-MSA selection → `msa_feat`), cropped to the window and
/// written into the stacked buffers.
#[allow(clippy::too_many_arguments)]
fn msa_features(
    tokens: &[u8],
    deletions: &[f32],
    rows: usize,
    width: usize,
    profile: &[f32],
    window: (usize, usize),
    cfg: &FeatureConfig,
    rng: &mut Rng,
    out: &mut StackedMsa,
    rc: usize,
) {
    let (start, len) = window;
    let (rr, n) = (out.r, out.n);
    let all: Vec<usize> = (0..rows).collect();
    let kept = if cfg.block_delete {
        block_delete(rows, cfg.msa_fraction_per_block, cfg.num_blocks, rng)
    } else {
        all
    };
    let (centres, extra) = sample_clusters(&kept, out.sc, rng);
    let gather = |idx: &[usize]| -> Vec<u8> {
        let mut v = Vec::with_capacity(idx.len() * width);
        for &r in idx {
            v.extend_from_slice(&tokens[r * width..(r + 1) * width]);
        }
        v
    };
    let true_centres = gather(&centres);
    let (bert_tok, bert_mask) = mask_msa(&true_centres, width, profile, cfg, rng);
    let extra_tok = gather(&extra);
    let assign = assign_clusters(&bert_tok, centres.len(), &extra_tok, extra.len(), width);
    let s = centres.len();

    // Cluster summaries over the crop window only; extra rows grouped by cluster (counting sort)
    // so one small accumulator is reused per centre.
    let mut offsets = vec![0usize; s + 1];
    for &a in &assign {
        offsets[a + 1] += 1;
    }
    for c in 0..s {
        offsets[c + 1] += offsets[c];
    }
    let mut fill = offsets.clone();
    let mut members = vec![0usize; assign.len()];
    for (k, &a) in assign.iter().enumerate() {
        members[fill[a]] = extra[k];
        fill[a] += 1;
    }
    let mut prof = vec![0f32; len * 23];
    let mut del_sum = vec![0f32; len];
    for (c, &r) in centres.iter().enumerate() {
        prof.fill(0.0);
        del_sum.fill(0.0);
        let group = &members[offsets[c]..offsets[c + 1]];
        for &e in group {
            let toks = &tokens[e * width + start..e * width + start + len];
            let dels = &deletions[e * width + start..e * width + start + len];
            for j in 0..len {
                prof[j * 23 + toks[j] as usize] += 1.0;
                del_sum[j] += dels[j];
            }
        }
        let denom = (1e-6f32 + 1.0) + group.len() as f32;
        out.msa_row_mask[c * rr + rc] = 1.0;
        for j in 0..len {
            let k = c * width + start + j;
            let t = bert_tok[k] as usize;
            let d = deletions[r * width + start + j];
            let p = &mut prof[j * 23..(j + 1) * 23];
            p[t] += 1.0;
            let base = (c * n + j) * 49;
            let mut put = |ch: usize, v: f32| out.msa_feat[(base + ch) * rr + rc] = v;
            put(t, 1.0);
            put(23, d.clamp(0.0, 1.0));
            put(24, del_value(d));
            for (a, &v) in p.iter().enumerate() {
                if v != 0.0 {
                    put(25 + a, v / denom);
                }
            }
            put(48, del_value((del_sum[j] + d) / denom));
            let pos = (c * n + j) * rr + rc;
            out.true_msa[pos] = true_centres[k] as i64;
            out.bert_mask[pos] = bert_mask[k];
            out.msa_mask[pos] = 1.0;
        }
    }
    // crop_extra_msa: a random subset (in random order) of the extra rows.
    let mut perm = rng.permutation(extra.len());
    perm.truncate(out.se.min(extra.len()));
    for (q, &p) in perm.iter().enumerate() {
        let r = extra[p];
        out.extra_msa_row_mask[q * rr + rc] = 1.0;
        for j in 0..len {
            let d = deletions[r * width + start + j];
            let pos = (q * n + j) * rr + rc;
            out.extra_msa[pos] = tokens[r * width + start + j] as i64;
            out.extra_has_deletion[pos] = d.clamp(0.0, 1.0);
            out.extra_deletion_value[pos] = del_value(d);
            out.extra_msa_mask[pos] = 1.0;
        }
    }
}

/// Slice residues `[start, start+len)` of a per-residue array with `per` values per residue,
/// zero-pad to `n_pad` residues and repeat every value `r` times (recycling axis last).
fn crop_pad<T: Copy + Default>(
    v: &[T],
    per: usize,
    start: usize,
    len: usize,
    n_pad: usize,
    r: usize,
) -> Vec<T> {
    let mut out = vec![T::default(); n_pad * per * r];
    for (k, &x) in v[start * per..(start + len) * per].iter().enumerate() {
        out[k * r..(k + 1) * r].fill(x);
    }
    out
}

fn f64s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Build one training sample (all recycles) from full-length inputs. Deterministic in
/// `(cfg.seed, index)`: the crop and clamp coin use streams `(seed, index, 0, Crop/ClampFape)`,
/// recycle `r` uses `(seed, index, r, Msa)`.
pub fn build_sample(input: &ProteinInput, cfg: &FeatureConfig, index: u64) -> Result<Sample> {
    build_sample_at(input, cfg, index, None)
}

/// [`build_sample`] with an optional fixed crop start (tests, evaluation).
pub fn build_sample_at(
    input: &ProteinInput,
    cfg: &FeatureConfig,
    index: u64,
    crop_start: Option<usize>,
) -> Result<Sample> {
    input.validate()?;
    let l = input.len();
    let n = cfg.crop_size.max(1);
    let len = l.min(n);
    let start = match crop_start {
        Some(s) => s.min(l - len),
        None => Rng::stream(cfg.seed, index, 0, Purpose::Crop).range_inclusive(0, l - len),
    };
    let clamp = Rng::stream(cfg.seed, index, 0, Purpose::ClampFape).next_f64() < cfg.clamp_prob;

    // Per-residue structure features on the full chain (torsions need the previous residue), then
    // cropped and padded.
    let aa = &input.aatype;
    let pos: Vec<f64> = input.positions.iter().map(|&v| v as f64).collect();
    let mask: Vec<f64> = input.mask.iter().map(|&v| v as f64).collect();
    let m14 = features::atom14_masks(aa);
    let p14 = features::atom14_positions(aa, &pos, &mask);
    let fr = features::atom37_to_frames(aa, &pos, &mask);
    let (bb, bbm) = fr.backbone();
    let tor = features::atom37_to_torsion_angles(aa, &pos, &mask);
    let (chi, chim) = tor.chi();
    let (pb, pbm) = features::pseudo_beta(aa, &pos, &mask);

    let nr = cfg.num_recycles.max(1);
    let mut fx: BTreeMap<String, Array> = BTreeMap::new();
    let with_r = |shape: &[usize]| -> Vec<usize> { shape.iter().copied().chain([nr]).collect() };
    let mut put_f = |k: &str, shape: &[usize], per: usize, v: &[f32]| {
        fx.insert(
            k.to_string(),
            Array::f32(&with_r(shape), crop_pad(v, per, start, len, n, nr)),
        );
    };
    put_f("all_atom_positions", &[n, 37, 3], 111, &input.positions);
    put_f("all_atom_mask", &[n, 37], 37, &input.mask);
    put_f("atom14_atom_exists", &[n, 14], 14, &m14.atom14_atom_exists);
    put_f("atom37_atom_exists", &[n, 37], 37, &m14.atom37_atom_exists);
    put_f(
        "atom14_gt_exists",
        &[n, 14],
        14,
        &f64s(&p14.atom14_gt_exists),
    );
    put_f(
        "atom14_gt_positions",
        &[n, 14, 3],
        42,
        &f64s(&p14.atom14_gt_positions),
    );
    put_f(
        "atom14_alt_gt_positions",
        &[n, 14, 3],
        42,
        &f64s(&p14.atom14_alt_gt_positions),
    );
    put_f(
        "atom14_alt_gt_exists",
        &[n, 14],
        14,
        &f64s(&p14.atom14_alt_gt_exists),
    );
    put_f(
        "atom14_atom_is_ambiguous",
        &[n, 14],
        14,
        &f64s(&p14.atom14_atom_is_ambiguous),
    );
    put_f(
        "rigidgroups_gt_frames",
        &[n, 8, 4, 4],
        128,
        &f64s(&fr.rigidgroups_gt_frames),
    );
    put_f(
        "rigidgroups_alt_gt_frames",
        &[n, 8, 4, 4],
        128,
        &f64s(&fr.rigidgroups_alt_gt_frames),
    );
    put_f(
        "rigidgroups_gt_exists",
        &[n, 8],
        8,
        &f64s(&fr.rigidgroups_gt_exists),
    );
    put_f(
        "rigidgroups_group_exists",
        &[n, 8],
        8,
        &f64s(&fr.rigidgroups_group_exists),
    );
    put_f(
        "rigidgroups_group_is_ambiguous",
        &[n, 8],
        8,
        &f64s(&fr.rigidgroups_group_is_ambiguous),
    );
    put_f("backbone_rigid_tensor", &[n, 4, 4], 16, &f64s(&bb));
    put_f("backbone_rigid_mask", &[n], 1, &f64s(&bbm));
    put_f("chi_angles_sin_cos", &[n, 4, 2], 8, &f64s(&chi));
    put_f("chi_mask", &[n, 4], 4, &f64s(&chim));
    put_f("pseudo_beta", &[n, 3], 3, &f64s(&pb));
    put_f("pseudo_beta_mask", &[n], 1, &f64s(&pbm));
    put_f("seq_mask", &[n], 1, &vec![1.0; l]);
    let mut tf = vec![0f32; l * 22];
    for (i, &a) in aa.iter().enumerate() {
        tf[i * 22 + 1 + (a as usize).min(20)] = 1.0; // channel 0: has_break (0 for one chain)
    }
    put_f("target_feat", &[n, 22], 22, &tf);
    let mut put_i = |k: &str, shape: &[usize], per: usize, v: &[i64]| {
        fx.insert(
            k.to_string(),
            Array::i64(&with_r(shape), crop_pad(v, per, start, len, n, nr)),
        );
    };
    let aatype_i: Vec<i64> = aa.iter().map(|&a| a as i64).collect();
    put_i("aatype", &[n], 1, &aatype_i);
    let ri: Vec<i64> = (0..l as i64).collect();
    put_i("residue_index", &[n], 1, &ri);
    put_i(
        "residx_atom14_to_atom37",
        &[n, 14],
        14,
        &m14.residx_atom14_to_atom37,
    );
    put_i(
        "residx_atom37_to_atom14",
        &[n, 37],
        37,
        &m14.residx_atom37_to_atom14,
    );
    fx.insert("seq_length".into(), Array::i64(&[nr], vec![len as i64; nr]));
    fx.insert(
        "resolution".into(),
        Array::f32(&[nr], vec![input.resolution; nr]),
    );
    fx.insert("is_distillation".into(), Array::f32(&[nr], vec![0.0; nr]));
    fx.insert(
        "use_clamped_fape".into(),
        Array::f32(&[nr], vec![if clamp { 1.0 } else { 0.0 }; nr]),
    );

    // MSA in aatype order, full length; resampled per recycle.
    let msa = &input.msa;
    let tokens: Vec<u8> = msa.tokens.iter().map(|&t| hhblits_to_aatype(t)).collect();
    let dels: Vec<f32> = msa.deletions.iter().map(|&d| d as f32).collect();
    let profile = msa_profile(&tokens, msa.rows, l);
    let mut stacked = StackedMsa::new(nr, n, cfg.max_msa_clusters.max(1), cfg.max_extra_msa);
    for r in 0..nr {
        let mut rng = Rng::stream(cfg.seed, index, r as u64, Purpose::Msa);
        msa_features(
            &tokens,
            &dels,
            msa.rows,
            l,
            &profile,
            (start, len),
            cfg,
            &mut rng,
            &mut stacked,
            r,
        );
    }
    stacked.into_features(&mut fx);
    Ok(Sample {
        id: input.id.clone(),
        index,
        features: fx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_delete_keeps_query_and_removes_blocks() {
        let mut rng = Rng::new(3);
        let kept = block_delete(100, 0.3, 5, &mut rng);
        assert_eq!(kept[0], 0);
        assert!(kept.len() < 100 && kept.len() > 1);
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(block_delete(1, 0.3, 5, &mut rng), vec![0]);
    }

    #[test]
    fn clusters_keep_query_first() {
        let mut rng = Rng::new(5);
        let rows: Vec<usize> = (0..10).collect();
        let (c, e) = sample_clusters(&rows, 4, &mut rng);
        assert_eq!(c[0], 0);
        assert_eq!((c.len(), e.len()), (4, 6));
        let mut all: Vec<usize> = c.iter().chain(&e).copied().collect();
        all.sort();
        assert_eq!(all, rows);
    }

    #[test]
    fn count_equal_matches_naive() {
        let mut r = Rng::new(2);
        for n in [0usize, 5, 31, 32, 33, 241, 9000] {
            let a: Vec<u8> = (0..n).map(|_| r.below(3) as u8).collect();
            let b: Vec<u8> = (0..n).map(|_| r.below(3) as u8).collect();
            let naive = a.iter().zip(&b).filter(|(x, y)| x == y).count() as u32;
            assert_eq!(count_equal(&a, &b), naive, "{n}");
        }
    }

    #[test]
    fn assignment_picks_most_agreeing_centre() {
        // Centres: AAAA, CC-- (gaps never agree), extra rows.
        let centres = [0u8, 0, 0, 0, 4, 4, 21, 21];
        let extra = [4u8, 4, 21, 21, 0, 0, 4, 4, 9, 9, 9, 9];
        let a = assign_clusters(&centres, 2, &extra, 3, 4);
        assert_eq!(a, vec![1, 0, 0]);
    }

    #[test]
    fn masking_statistics() {
        let cfg = FeatureConfig {
            crop_size: 8,
            max_msa_clusters: 4,
            max_extra_msa: 4,
            replace_fraction: 0.15,
            uniform_prob: 0.1,
            profile_prob: 0.1,
            same_prob: 0.1,
            block_delete: false,
            msa_fraction_per_block: 0.3,
            num_blocks: 5,
            num_recycles: 1,
            clamp_prob: 0.9,
            seed: 0,
        };
        let tokens = vec![3u8; 100_000];
        let mut profile = vec![0f32; 22];
        profile[3] = 1.0;
        let (out, bert) = mask_msa(&tokens, 1, &profile, &cfg, &mut Rng::new(9));
        let sel: f32 = bert.iter().sum::<f32>() / bert.len() as f32;
        assert!((sel - 0.15).abs() < 0.01, "{sel}");
        let masked =
            out.iter().filter(|&&t| t == MASK_TOKEN).count() as f32 / bert.iter().sum::<f32>();
        assert!((masked - 0.7).abs() < 0.02, "{masked}");
        // Unselected positions are untouched.
        assert!(out.iter().zip(&bert).all(|(&t, &b)| b == 1.0 || t == 3));
    }
}
