//! CUDA-graph capture of the AF2 training step (`train::graph`) on a GPU: a replay equals the eager
//! step on the same inputs and dropout pool, for different samples, recycle counts and seeds; the
//! no-dropout replay equals the trainer's own `AlphaFold::loss_and_grads`. Skipped (with a
//! message) when no CUDA device is visible.

#![cfg(feature = "cuda")]

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use clap::Parser;
use ferrofold::bench::{step_config, synthetic_features, StepBenchArgs};
use ferrofold::config::Config;
use ferrofold::loss::{alphafold_loss, LossBatch, LossTables};
use ferrofold::model::alphafold::{AfBatch, AlphaFold};
use ferrofold::model::init::SeededVarMap;
use ferrofold::train::graph::{compare_steps, graph_device, StepGraph};
use ferrofold::train::optim::{params_from_varmap, Params};

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    a: StepBenchArgs,
}

fn config() -> Config {
    let w = Wrap::parse_from([
        "x",
        "--tiny",
        "--n-res",
        "24",
        "--n-seq",
        "6",
        "--n-extra",
        "10",
        "--blocks",
        "2",
        "--extra-blocks",
        "1",
        "--sm-layers",
        "2",
        "--recycles",
        "1",
    ]);
    step_config(&w.a)
}

/// `$FERROFOLD_STEREO_PROPS`, else beside the golden dir (`$FERROFOLD_GOLDEN_DIR/../../data/`),
/// else `../shared/data/` from the crate.
fn stereo() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("FERROFOLD_STEREO_PROPS") {
        return p.into();
    }
    if let Some(g) = std::env::var_os("FERROFOLD_GOLDEN_DIR") {
        let p = std::path::PathBuf::from(g).join("../../data/stereo_chemical_props.txt");
        if p.exists() {
            return p;
        }
    }
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/stereo_chemical_props.txt")
}

struct Setup {
    cfg: Config,
    model: AlphaFold,
    params: Params,
    tables: LossTables,
    feats: Vec<BTreeMap<String, Tensor>>,
}

fn setup() -> Option<(candle_core::Device, Setup)> {
    if ferrofold::device::cuda_device_count() == 0 {
        eprintln!("gpu_graphs: no CUDA device visible, skipping");
        return None;
    }
    let dev = graph_device(0).unwrap();
    let cfg = config();
    let init = SeededVarMap::new(5);
    let mut model = AlphaFold::new(init.builder(DType::F32, &dev), &cfg.model).unwrap();
    model.set_precision(cfg.train.precision);
    let params = params_from_varmap(&init.varmap).unwrap();
    // AF2 init zeroes some output projections: perturb every parameter so all gradients flow.
    for (i, p) in params.values().enumerate() {
        let noise =
            (Tensor::randn(0f32, 0.02, p.dims(), &dev).unwrap() * (1.0 + i as f64 * 1e-3)).unwrap();
        p.set(&(p.as_tensor() + noise).unwrap()).unwrap();
    }
    let tables = LossTables::load(&stereo(), &cfg.loss.violation, &dev).unwrap();
    let feats = (1..=2)
        .map(|s| synthetic_features(&cfg, s).unwrap())
        .collect();
    Some((
        dev,
        Setup {
            cfg,
            model,
            params,
            tables,
            feats,
        },
    ))
}

#[test]
fn graph_replay_equals_eager_across_samples_recycles_and_seeds() {
    let Some((dev, s)) = setup() else { return };
    let mut g = StepGraph::new(&dev, &s.feats[0], true).unwrap();
    let mut losses = Vec::new();
    for (k, (fi, r, seed)) in [(0, 0, 11), (1, 0, 12), (0, 1, 13), (1, 1, 14), (0, 0, 15)]
        .into_iter()
        .enumerate()
    {
        g.prepare(&s.feats[fi], r, seed).unwrap();
        let replay = g
            .run(&s.model, &s.params, &s.tables, &s.cfg.loss)
            .unwrap()
            .clone();
        let eager = g
            .eager(&s.model, &s.params, &s.tables, &s.cfg.loss)
            .unwrap();
        let d = compare_steps(&eager, &replay).unwrap();
        let loss = replay.loss_value().unwrap();
        eprintln!(
            "case {k}: sample {fi} recycles {r} seed {seed}: loss {loss:.6} max rel {:.3e} at {} \
             (bitwise {}, {} tensors)",
            d.max_rel, d.worst, d.bitwise, d.compared
        );
        assert!(loss.is_finite());
        assert!(d.max_rel <= 1e-6, "replay != eager: {d:?}");
        assert!(d.compared > s.params.len());
        losses.push(loss);
    }
    assert_eq!(g.captured(), vec![0, 1]);
    // The inputs really change between replays.
    assert_ne!(losses[0], losses[1]);
    // Some gradient is non-zero.
    g.prepare(&s.feats[0], 0, 11).unwrap();
    let out = g.run(&s.model, &s.params, &s.tables, &s.cfg.loss).unwrap();
    let gsum: f64 = out
        .grads
        .values()
        .map(|t| {
            t.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .sum();
    assert!(gsum > 0.0 && gsum.is_finite(), "{gsum}");
}

#[test]
fn graph_replay_without_dropout_equals_trainer_loss_and_grads() {
    let Some((dev, s)) = setup() else { return };
    let mut g = StepGraph::new(&dev, &s.feats[0], false).unwrap();
    for (fi, r) in [(0usize, 1usize), (1, 1), (1, 0)] {
        g.prepare(&s.feats[fi], r, 0).unwrap();
        let replay = g
            .run(&s.model, &s.params, &s.tables, &s.cfg.loss)
            .unwrap()
            .clone();
        // The trainer's path: host-read loss, breakdown read inside the loss.
        let feats: BTreeMap<String, Tensor> = s.feats[fi]
            .iter()
            .map(|(k, t)| (k.clone(), t.to_device(&dev).unwrap()))
            .collect();
        let batch = AfBatch::from_last_dim(&feats).unwrap();
        let lb = LossBatch::from_last_dim(&feats, r).unwrap();
        let res = s
            .model
            .loss_and_grads(&s.params, &batch, r, None, |out| {
                let l = alphafold_loss(&out.loss_outputs(), &lb, &s.tables, &s.cfg.loss)?;
                Ok((l.loss, l.breakdown))
            })
            .unwrap();
        let loss = replay.loss_value().unwrap();
        let rel = (loss - res.loss).abs() / res.loss.abs().max(1e-30);
        eprintln!(
            "sample {fi} recycles {r}: replay {loss:.8} trainer {:.8}",
            res.loss
        );
        assert!(rel <= 1e-6, "loss {loss} vs {}", res.loss);
        let bd = replay.breakdown().unwrap();
        for (k, v) in &res.aux.terms {
            let w = bd.terms[k];
            assert!(
                (w - v).abs() <= 1e-6 * v.abs().max(1.0),
                "term {k}: replay {w} trainer {v}"
            );
        }
        for (name, gt) in &res.grads {
            let x = gt.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            let y = replay.grads[name]
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap();
            let d = (&x - &y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let m = x
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d <= 1e-6 * m.max(1e-12), "grad {name}: {d} (max {m})");
        }
    }
}
