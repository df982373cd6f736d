//! Gradient flow through IPA, the structure module and the heads: with random parameters every
//! parameter must receive a finite, non-zero gradient, except the documented structurally-zero
//! ones (IPA `linear_b.bias`: it shifts all logits of a head equally, so the softmax ignores it).
//! Also: training-mode dropout is deterministic per seed and off in eval.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ferrofold::config::{HeadsConfig, StructureConfig, TmHead};
use ferrofold::geometry::rigid::{quat_normalize, Rigid};
use ferrofold::model::heads::AuxiliaryHeads;
use ferrofold::model::ipa::{InvariantPointAttention, IpaConfig};
use ferrofold::model::structure_module::StructureModule;

/// Deterministic N(0,1)-ish values (sum of uniforms) from an LCG.
fn rand(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let mut acc = 0.0;
        for _ in 0..4 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            acc += (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        }
        v.push(acc * 1.7 * scale);
    }
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Replace every parameter by random values (the AF2 "final" zero inits would otherwise block
/// the gradient to everything upstream). Sorted names for determinism.
fn randomize(vm: &VarMap) {
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let v = &data[name];
        let fan_in = *v.dims().last().unwrap_or(&1) as f64;
        let scale = if v.rank() == 2 {
            1.0 / fan_in.sqrt()
        } else {
            0.3
        };
        let mut t = rand(v.dims(), 1000 + i as u64, scale)
            .to_dtype(v.dtype())
            .unwrap();
        if name.ends_with("layer_norm.weight")
            || name.contains("layer_norm_") && name.ends_with(".weight")
        {
            t = (t + 1.0).unwrap();
        }
        v.set(&t).unwrap();
    }
}

/// Check every parameter gradient: finite, and non-zero unless `structurally_zero(name)`.
fn check_grads(vm: &VarMap, loss: &Tensor, structurally_zero: &[&str]) {
    let grads = loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut failures = vec![];
    let mut scale = 0.0f64;
    let mut zero_max = 0.0f64;
    for name in &names {
        let g = match grads.get(data[*name].as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            None => {
                failures.push(format!("{name}: no gradient"));
                continue;
            }
        };
        let m = g.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        if g.iter().any(|x| !x.is_finite()) {
            failures.push(format!("{name}: non-finite gradient"));
        }
        if structurally_zero.iter().any(|s| name.ends_with(s)) {
            zero_max = zero_max.max(m);
        } else {
            scale = scale.max(m);
            if m == 0.0 {
                failures.push(format!("{name}: zero gradient"));
            }
        }
    }
    // Structurally-zero gradients are roundoff only.
    if zero_max > 1e-10 * scale.max(1.0) {
        failures.push(format!(
            "structurally-zero gradient too large: {zero_max:e} (scale {scale:e})"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn small_sm_config() -> StructureConfig {
    StructureConfig {
        c_ipa: 4,
        c_resnet: 6,
        no_heads_ipa: 2,
        no_qk_points: 3,
        no_v_points: 2,
        no_blocks: 2,
        ..StructureConfig::default()
    }
}

const N: usize = 7;
const C_S: usize = 10;
const C_Z: usize = 6;
const C_M: usize = 5;

#[test]
fn sm_gradflow_ipa() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let cfg = IpaConfig::from_structure(&small_sm_config(), C_S, C_Z);
    let ipa = InvariantPointAttention::new(vb, &cfg).unwrap();
    randomize(&vm);
    let q = quat_normalize(&rand(&[N, 4], 1, 1.0)).unwrap();
    let r = Rigid::from_quat(&q, &rand(&[N, 3], 2, 3.0), false).unwrap();
    let mask = Tensor::new(&[1.0f64, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0], &Device::Cpu).unwrap();
    let out = ipa
        .forward(
            &rand(&[N, C_S], 3, 1.0),
            &rand(&[N, N, C_Z], 4, 1.0),
            &r,
            &mask,
        )
        .unwrap();
    let loss = (out * rand(&[N, C_S], 5, 1.0)).unwrap().sum_all().unwrap();
    check_grads(&vm, &loss, &["linear_b.bias"]);
}

#[test]
fn sm_gradflow_structure_module() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let sm = StructureModule::new(vb, C_S, C_Z, &small_sm_config()).unwrap();
    randomize(&vm);
    // Residue types with chi1..chi4 (ARG, LYS), so every torsion reaches the positions.
    let aatype = Tensor::new(&[1u32, 11, 0, 5, 19, 1, 13], &Device::Cpu).unwrap();
    let mask = Tensor::ones(N, DType::F64, &Device::Cpu).unwrap();
    let out = sm
        .forward(
            &rand(&[N, C_S], 6, 1.0),
            &rand(&[N, N, C_Z], 7, 1.0),
            &aatype,
            &mask,
            None,
        )
        .unwrap();
    // A loss over every output, as in training (FAPE on frames/positions, angles, states).
    let terms = [
        (out.frames.clone(), 8),
        (out.positions.clone(), 9),
        (out.unnormalized_angles.clone(), 10),
        (out.angles.clone(), 11),
        (out.states.clone(), 12),
        (out.single.clone(), 13),
    ];
    let mut loss = Tensor::zeros((), DType::F64, &Device::Cpu).unwrap();
    for (t, seed) in terms {
        let c = rand(t.dims(), seed, 1.0);
        loss = (loss + (t * c).unwrap().sum_all().unwrap()).unwrap();
    }
    check_grads(&vm, &loss, &["ipa.linear_b.bias"]);
}

#[test]
fn sm_gradflow_heads() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let cfg = HeadsConfig {
        plddt_c_hidden: 8,
        tm: TmHead::On,
        ..HeadsConfig::default()
    };
    let heads = AuxiliaryHeads::new(vb, C_M, C_Z, C_S, &cfg).unwrap();
    randomize(&vm);
    let s = rand(&[N, C_S], 20, 1.0);
    let out = heads
        .forward(
            &s,
            &rand(&[N, C_S], 21, 1.0),
            &rand(&[3, N, C_M], 22, 1.0),
            &rand(&[N, N, C_Z], 23, 1.0),
        )
        .unwrap();
    let mut loss = Tensor::zeros((), DType::F64, &Device::Cpu).unwrap();
    let tm = out.tm_logits.clone().unwrap();
    for (i, t) in [
        out.lddt_logits,
        out.distogram_logits,
        out.masked_msa_logits,
        out.experimentally_resolved_logits,
        tm,
    ]
    .into_iter()
    .enumerate()
    {
        let c = rand(t.dims(), 30 + i as u64, 1.0);
        loss = (loss + (t * c).unwrap().sum_all().unwrap()).unwrap();
    }
    check_grads(&vm, &loss, &[]);
}

#[test]
fn sm_dropout_is_seeded_and_off_in_eval() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let sm = StructureModule::new(vb, C_S, C_Z, &small_sm_config()).unwrap();
    randomize(&vm);
    let aatype = Tensor::new(&[1u32, 11, 0, 5, 19, 1, 13], &Device::Cpu).unwrap();
    let mask = Tensor::ones(N, DType::F64, &Device::Cpu).unwrap();
    let (s, z) = (rand(&[N, C_S], 6, 1.0), rand(&[N, N, C_Z], 7, 1.0));
    let run = |seed| sm.forward(&s, &z, &aatype, &mask, seed).unwrap().positions;
    let diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let eval1 = run(None);
    let eval2 = run(None);
    assert_eq!(diff(&eval1, &eval2), 0.0);
    let t1 = run(Some(7));
    let t2 = run(Some(7));
    let t3 = run(Some(8));
    assert_eq!(
        diff(&t1, &t2),
        0.0,
        "same seed must give the same dropout masks"
    );
    assert!(diff(&t1, &t3) > 1e-6, "different seeds must differ");
    assert!(diff(&t1, &eval1) > 1e-6, "training differs from eval");
    // The elementwise mask keeps ~90% of entries, scaled by 1/0.9.
    let x = Tensor::ones(20_000, DType::F64, &Device::Cpu).unwrap();
    let y: Vec<f64> = ferrofold::model::structure_module::dropout(&x, 0.1, 3)
        .unwrap()
        .to_vec1()
        .unwrap();
    let kept = y.iter().filter(|v| **v > 0.0).count() as f64 / y.len() as f64;
    assert!((kept - 0.9).abs() < 0.01, "kept fraction {kept}");
    assert!(y.iter().all(|v| *v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-12));
}

/// Leading batch dims: a batch of 2 equals the two samples run separately (IPA and SM).
#[test]
fn sm_batched_equals_unbatched() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let sm = StructureModule::new(vb, C_S, C_Z, &small_sm_config()).unwrap();
    randomize(&vm);
    let s = rand(&[2, N, C_S], 40, 1.0);
    let z = rand(&[2, N, N, C_Z], 41, 1.0);
    let aatype = Tensor::new(
        &[[1u32, 11, 0, 5, 19, 1, 13], [2, 3, 4, 6, 7, 8, 20]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(
        &[
            [1.0f64, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
            [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let both = sm.forward(&s, &z, &aatype, &mask, None).unwrap();
    for b in 0..2 {
        let one = sm
            .forward(
                &s.get(b).unwrap(),
                &z.get(b).unwrap(),
                &aatype.get(b).unwrap(),
                &mask.get(b).unwrap(),
                None,
            )
            .unwrap();
        for (name, x, y) in [
            ("frames", &both.frames, &one.frames),
            (
                "sidechain_frames",
                &both.sidechain_frames,
                &one.sidechain_frames,
            ),
            ("positions", &both.positions, &one.positions),
            ("angles", &both.angles, &one.angles),
            ("states", &both.states, &one.states),
        ] {
            let xb = x.narrow(1, b, 1).unwrap().squeeze(1).unwrap();
            let d = (xb - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-12, "{name} batch {b}: {d}");
        }
        let d = (both.single.get(b).unwrap() - &one.single)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12);
    }
}

/// Half-precision input: the structure module computes in f32 (outputs f32), equal to an f32 run
/// on the same (bf16-rounded) inputs.
#[test]
fn sm_bf16_input_runs_in_f32() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let sm = StructureModule::new(vb, C_S, C_Z, &small_sm_config()).unwrap();
    randomize(&vm);
    let s = rand(&[N, C_S], 50, 1.0).to_dtype(DType::BF16).unwrap();
    let z = rand(&[N, N, C_Z], 51, 1.0).to_dtype(DType::BF16).unwrap();
    let aatype = Tensor::new(&[1u32, 11, 0, 5, 19, 1, 13], &Device::Cpu).unwrap();
    let mask = Tensor::ones(N, DType::BF16, &Device::Cpu).unwrap();
    let half = sm.forward(&s, &z, &aatype, &mask, None).unwrap();
    assert_eq!(half.positions.dtype(), DType::F32);
    let full = sm
        .forward(
            &s.to_dtype(DType::F32).unwrap(),
            &z.to_dtype(DType::F32).unwrap(),
            &aatype,
            &mask.to_dtype(DType::F32).unwrap(),
            None,
        )
        .unwrap();
    let d = (half.positions - full.positions)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
}

/// Timing at AF2 sizes (c_s 384, c_z 128, 8 blocks): `cargo test --release --test sm_gradflow
/// -- --ignored --nocapture sm_timing` (env `SM_TIMING_N`, default 64).
#[test]
#[ignore]
fn sm_timing() {
    let n: usize = std::env::var("SM_TIMING_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let sm = StructureModule::new(vb, 384, 128, &StructureConfig::default()).unwrap();
    randomize(&vm);
    let s = rand(&[n, 384], 60, 1.0).to_dtype(DType::F32).unwrap();
    let z = rand(&[n, n, 128], 61, 1.0).to_dtype(DType::F32).unwrap();
    let aatype = Tensor::new(
        (0..n as u32).map(|i| i % 20).collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
    let t0 = std::time::Instant::now();
    let out = sm.forward(&s, &z, &aatype, &mask, Some(1)).unwrap();
    let t1 = std::time::Instant::now();
    let loss = (out.positions.sum_all().unwrap() + out.angles.sum_all().unwrap()).unwrap();
    let _ = loss.backward().unwrap();
    let t2 = std::time::Instant::now();
    eprintln!("N={n}: forward {:?}, backward {:?}", t1 - t0, t2 - t1);
}

/// IPA timing at AF2 sizes: `cargo test --release --test sm_gradflow -- --ignored --nocapture
/// ipa_timing` (env `SM_TIMING_N`, default 64).
#[test]
#[ignore]
fn ipa_timing() {
    let n: usize = std::env::var("SM_TIMING_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let ipa = InvariantPointAttention::new(
        vb,
        &IpaConfig::from_structure(&StructureConfig::default(), 384, 128),
    )
    .unwrap();
    randomize(&vm);
    let s = rand(&[n, 384], 60, 1.0).to_dtype(DType::F32).unwrap();
    let z = rand(&[n, n, 128], 61, 1.0).to_dtype(DType::F32).unwrap();
    let q = quat_normalize(&rand(&[n, 4], 1, 1.0)).unwrap();
    let r = Rigid::from_quat(&q, &rand(&[n, 3], 2, 3.0), false)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let mask = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
    let t0 = std::time::Instant::now();
    let out = ipa.forward(&s, &z, &r, &mask).unwrap();
    let t1 = std::time::Instant::now();
    let _ = out.sum_all().unwrap().backward().unwrap();
    let t2 = std::time::Instant::now();
    eprintln!("IPA N={n}: forward {:?}, backward {:?}", t1 - t0, t2 - t1);
}
