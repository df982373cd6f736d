//! Model-ready samples: a map of feature name → (shape, f32 or i64 data) with the same keys and
//! shapes as OpenFold's model batch (recycling dimension LAST), convertible to candle tensors.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Feature payload.
#[derive(Debug, Clone, PartialEq)]
pub enum ArrayData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// One feature: row-major data and its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: ArrayData,
}

impl Array {
    pub fn f32(shape: &[usize], v: Vec<f32>) -> Array {
        debug_assert_eq!(shape.iter().product::<usize>(), v.len());
        Array {
            shape: shape.to_vec(),
            data: ArrayData::F32(v),
        }
    }

    pub fn i64(shape: &[usize], v: Vec<i64>) -> Array {
        debug_assert_eq!(shape.iter().product::<usize>(), v.len());
        Array {
            shape: shape.to_vec(),
            data: ArrayData::I64(v),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            ArrayData::F32(v) => v.len(),
            ArrayData::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// f32 data (None for integer features).
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            ArrayData::F32(v) => Some(v),
            ArrayData::I64(_) => None,
        }
    }

    /// i64 data (None for float features).
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            ArrayData::I64(v) => Some(v),
            ArrayData::F32(_) => None,
        }
    }

    /// A candle tensor: floats as `float_dtype` (F32/F64/BF16…), integers as I64.
    pub fn to_tensor(&self, device: &Device, float_dtype: DType) -> Result<Tensor> {
        let t = match &self.data {
            ArrayData::F32(v) => {
                Tensor::from_slice(v, self.shape.as_slice(), device)?.to_dtype(float_dtype)?
            }
            ArrayData::I64(v) => Tensor::from_slice(v, self.shape.as_slice(), device)?,
        };
        Ok(t)
    }

    /// Stack arrays of equal shape along a new LAST axis.
    pub fn stack_last(parts: &[&Array]) -> Result<Array> {
        let first = parts
            .first()
            .ok_or_else(|| Error::Msg("stack_last: no arrays".into()))?;
        let r = parts.len();
        let mut shape = first.shape.clone();
        if parts.iter().any(|p| p.shape != first.shape) {
            return Err(Error::Msg(format!(
                "stack_last: shape mismatch for {shape:?}"
            )));
        }
        shape.push(r);
        fn interleave<T: Copy + Default>(vs: &[&[T]]) -> Vec<T> {
            let n = vs[0].len();
            let r = vs.len();
            let mut out = vec![T::default(); n * r];
            for (j, v) in vs.iter().enumerate() {
                for (k, &x) in v.iter().enumerate() {
                    out[k * r + j] = x;
                }
            }
            out
        }
        let data = match &first.data {
            ArrayData::F32(_) => {
                let vs: Option<Vec<&[f32]>> = parts.iter().map(|p| p.as_f32()).collect();
                let vs = vs.ok_or_else(|| Error::Msg("stack_last: dtype mismatch".into()))?;
                ArrayData::F32(interleave(&vs))
            }
            ArrayData::I64(_) => {
                let vs: Option<Vec<&[i64]>> = parts.iter().map(|p| p.as_i64()).collect();
                let vs = vs.ok_or_else(|| Error::Msg("stack_last: dtype mismatch".into()))?;
                ArrayData::I64(interleave(&vs))
            }
        };
        Ok(Array { shape, data })
    }
}

/// One training example: all recycles of one cropped, padded chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Chain id, e.g. `4zey_A`.
    pub id: String,
    /// Position in the loader's sample stream (the seed's sample index).
    pub index: u64,
    /// Feature name → array with the recycling dimension last.
    pub features: BTreeMap<String, Array>,
}

/// The 40 keys of OpenFold's monomer training batch (templates off), in sorted order.
pub const BATCH_KEYS: [&str; 40] = [
    "aatype",
    "all_atom_mask",
    "all_atom_positions",
    "atom14_alt_gt_exists",
    "atom14_alt_gt_positions",
    "atom14_atom_exists",
    "atom14_atom_is_ambiguous",
    "atom14_gt_exists",
    "atom14_gt_positions",
    "atom37_atom_exists",
    "backbone_rigid_mask",
    "backbone_rigid_tensor",
    "bert_mask",
    "chi_angles_sin_cos",
    "chi_mask",
    "extra_deletion_value",
    "extra_has_deletion",
    "extra_msa",
    "extra_msa_mask",
    "extra_msa_row_mask",
    "is_distillation",
    "msa_feat",
    "msa_mask",
    "msa_row_mask",
    "pseudo_beta",
    "pseudo_beta_mask",
    "residue_index",
    "residx_atom14_to_atom37",
    "residx_atom37_to_atom14",
    "resolution",
    "rigidgroups_alt_gt_frames",
    "rigidgroups_group_exists",
    "rigidgroups_group_is_ambiguous",
    "rigidgroups_gt_exists",
    "rigidgroups_gt_frames",
    "seq_length",
    "seq_mask",
    "target_feat",
    "true_msa",
    "use_clamped_fape",
];

impl Sample {
    /// Number of recycling copies (size of the last axis).
    pub fn num_recycles(&self) -> usize {
        self.features
            .get("aatype")
            .and_then(|a| a.shape.last().copied())
            .unwrap_or(0)
    }

    /// Feature by name.
    pub fn get(&self, key: &str) -> Result<&Array> {
        self.features.get(key).ok_or_else(|| Error::Data {
            what: self.id.clone(),
            msg: format!("sample has no feature `{key}`"),
        })
    }

    /// All features as candle tensors (no batch dimension, recycling last), floats as `float_dtype`.
    pub fn to_tensors(
        &self,
        device: &Device,
        float_dtype: DType,
    ) -> Result<HashMap<String, Tensor>> {
        self.features
            .iter()
            .map(|(k, a)| Ok((k.clone(), a.to_tensor(device, float_dtype)?)))
            .collect()
    }

    /// Approximate size in bytes.
    pub fn nbytes(&self) -> usize {
        self.features.values().map(|a| a.len() * 4).sum()
    }
}

/// Several samples trained together (one per data-parallel replica step).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub samples: Vec<Sample>,
}

impl Batch {
    /// Tensors with a leading batch dimension (`[B, ..., R]`), floats as `float_dtype`.
    pub fn to_tensors(
        &self,
        device: &Device,
        float_dtype: DType,
    ) -> Result<HashMap<String, Tensor>> {
        batch_tensors(&self.samples, device, float_dtype)
    }
}

/// Stack several samples' tensors along a new leading batch dimension.
pub fn batch_tensors(
    samples: &[Sample],
    device: &Device,
    float_dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    let first = samples
        .first()
        .ok_or_else(|| Error::Msg("batch_tensors: no samples".into()))?;
    let mut out = HashMap::new();
    for key in first.features.keys() {
        let ts: Vec<Tensor> = samples
            .iter()
            .map(|s| s.get(key)?.to_tensor(device, float_dtype))
            .collect::<Result<_>>()?;
        out.insert(key.clone(), Tensor::stack(&ts, 0)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_last_interleaves() {
        let a = Array::f32(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let b = Array::f32(&[2, 2], vec![5.0, 6.0, 7.0, 8.0]);
        let s = Array::stack_last(&[&a, &b]).unwrap();
        assert_eq!(s.shape, vec![2, 2, 2]);
        assert_eq!(
            s.as_f32().unwrap(),
            &[1.0, 5.0, 2.0, 6.0, 3.0, 7.0, 4.0, 8.0]
        );
        let t = s.to_tensor(&Device::Cpu, DType::F64).unwrap();
        let back: Vec<f64> = t
            .narrow(2, 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(back, vec![5.0, 6.0, 7.0, 8.0]);
    }
}
