//! `ferrofold bench step` on the CPU at tiny dimensions (one step): the whole training-step code
//! path (synthetic sample through the data pipeline, forward over recycles, AF2 loss, remat
//! backward, Adam) runs and reports; plus the synthetic sample's validity and the host-sync-free
//! step (`train::graph::device_step`) against the trainer's `loss_and_grads` on the CPU.

use std::collections::BTreeMap;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use ferrofold::bench::{step_config, synthetic_features, synthetic_protein, StepBenchArgs};
use ferrofold::loss::{alphafold_loss, LossBatch, LossTables};
use ferrofold::model::alphafold::{AfBatch, AlphaFold};
use ferrofold::model::init::SeededVarMap;
use ferrofold::train::graph::{compare_steps, device_step};
use ferrofold::train::optim::params_from_varmap;

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

const TINY: &[&str] = &[
    "--tiny",
    "--n-res",
    "12",
    "--n-seq",
    "4",
    "--n-extra",
    "6",
    "--blocks",
    "2",
    "--extra-blocks",
    "1",
    "--sm-layers",
    "2",
];

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

#[test]
fn bench_step_cpu_runs_one_step_and_reports() {
    let stereo = stereo();
    let o = Command::new(env!("CARGO_BIN_EXE_ferrofold"))
        .args([
            "bench", "step", "--device", "cpu", "--iters", "1", "--warmup", "0",
        ])
        .args(["--recycles", "1", "--stack", "--graphs", "both"])
        .args(["--stereo-props", stereo.to_str().unwrap()])
        .args(TINY)
        .output()
        .expect("spawn ferrofold");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("| mode | step ms | samples/s | peak MiB | loss | parts (ms) |"),
        "{out}"
    );
    let results: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("RESULT step"))
        .collect();
    assert_eq!(results.len(), 2, "{out}");
    let eager = results
        .iter()
        .find(|l| field(l, "mode") == "eager")
        .expect("eager row");
    let loss: f64 = field(eager, "loss").parse().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{eager}");
    let ms: f64 = field(eager, "step_ms").parse().unwrap();
    assert!(ms > 0.0);
    for part in ["forward", "loss", "backward", "optimizer"] {
        assert!(out.contains(&format!("{part} ")), "{part}: {out}");
    }
    // No CUDA here: the graph mode reports why it did not run instead of failing.
    assert!(out.contains("GRAPH_ERROR"), "{out}");
}

#[test]
fn synthetic_sample_is_valid() {
    let p = synthetic_protein(30, 5, 3);
    p.validate().unwrap();
    // consecutive Cα 3.8 Å apart
    let ca = |i: usize| &p.positions[(i * 37 + 1) * 3..(i * 37 + 1) * 3 + 3];
    for i in 1..30 {
        let d: f32 = (0..3)
            .map(|k| (ca(i)[k] - ca(i - 1)[k]).powi(2))
            .sum::<f32>()
            .sqrt();
        assert!((d - 3.8).abs() < 1e-3, "{d}");
    }
    let w = Wrap::parse_from(["x", "--recycles", "2"].iter().chain(TINY.iter()));
    let cfg = step_config(&w.a);
    let f = synthetic_features(&cfg, 1).unwrap();
    assert_eq!(f["aatype"].dims(), &[12, 3]);
    assert_eq!(f["msa_feat"].dims()[0..2], [4, 12]);
    assert_eq!(f["extra_msa"].dims()[0..2], [6, 12]);
    let mask: f32 = f["seq_mask"].sum_all().unwrap().to_scalar().unwrap();
    assert_eq!(mask, 36.0);
}

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    a: StepBenchArgs,
}

/// The host-sync-free step (what a CUDA graph captures) equals the trainer's path on the CPU.
#[test]
fn device_step_equals_trainer_loss_and_grads_on_cpu() {
    let w = Wrap::parse_from(["x", "--recycles", "1"].iter().chain(TINY.iter()));
    let cfg = step_config(&w.a);
    let dev = Device::Cpu;
    let init = SeededVarMap::new(9);
    let mut model = AlphaFold::new(init.builder(DType::F32, &dev), &cfg.model).unwrap();
    model.set_precision(cfg.train.precision);
    let params = params_from_varmap(&init.varmap).unwrap();
    let tables = LossTables::load(&stereo(), &cfg.loss.violation, &dev).unwrap();
    let feats: BTreeMap<String, Tensor> = synthetic_features(&cfg, 4).unwrap();
    let r = 1;
    let dev_step = device_step(&model, &params, &feats, &tables, &cfg.loss, r, None).unwrap();
    let batch = AfBatch::from_last_dim(&feats).unwrap();
    let lb = LossBatch::from_last_dim(&feats, r).unwrap();
    let res = model
        .loss_and_grads(&params, &batch, r, None, |out| {
            let l = alphafold_loss(&out.loss_outputs(), &lb, &tables, &cfg.loss)?;
            Ok((l.loss, l.terms))
        })
        .unwrap();
    let trainer = ferrofold::train::graph::StepOutputs {
        loss: Tensor::new(res.loss, &dev).unwrap(),
        terms: res.aux,
        grads: res.grads,
        final_atom_positions: res.output.final_atom_positions,
    };
    let d = compare_steps(&trainer, &dev_step).unwrap();
    assert!(d.bitwise, "{d:?}");
    let bd = dev_step.breakdown().unwrap();
    assert!(bd.get("loss").unwrap().is_finite());
    assert!((bd.get("loss").unwrap() - res.loss).abs() <= 1e-6 * res.loss.abs());
}
