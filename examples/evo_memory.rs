//! Peak resident memory of one EvoformerStack forward+backward, with or without remat.
//!
//! `cargo run --release --example evo_memory -- <none|block> [blocks=4] [n_seq=32] [n_res=64]`
//! (AF2 channel sizes, f32, CPU). Run once per mode: each process reports its own VmHWM.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ferrofold::config::{Remat, StackConfig};
use ferrofold::model::evoformer::{BlockConfig, EvoformerStack};

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let remat = match args.first().map(String::as_str) {
        Some("none") => Remat::None,
        Some("block") => Remat::Block,
        _ => anyhow::bail!("usage: evo_memory <none|block> [blocks] [n_seq] [n_res]"),
    };
    let num = |i: usize, d: usize| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(d);
    let (blocks, s, r) = (num(1, 4), num(2, 32), num(3, 64));
    let cfg = BlockConfig {
        c_m: 256,
        c_z: 128,
        stack: StackConfig {
            num_blocks: blocks,
            ..StackConfig::evoformer()
        },
        inf: 1e9,
        eps_opm: 1e-3,
        eps_global: 1e-8,
        backward: ferrofold::config::TrunkBackward::Manual,
    };
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let stack = EvoformerStack::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg, 384)?;
    let m = Tensor::randn(0f32, 1.0, (s, r, 256), &dev)?;
    let z = Tensor::randn(0f32, 1.0, (r, r, 128), &dev)?;
    let mm = Tensor::ones((s, r), DType::F32, &dev)?;
    let pm = Tensor::ones((r, r), DType::F32, &dev)?;
    let base = vm_hwm_kib();
    let t0 = std::time::Instant::now();
    let (out, tape) = stack.forward_train(&m, &z, &mm, &pm, None, remat)?;
    let after_fwd = vm_hwm_kib();
    let grads = tape.backward(
        &out.m.ones_like()?,
        &out.z.ones_like()?,
        &out.s.ones_like()?,
    )?;
    let secs = t0.elapsed().as_secs_f64();
    let n_grads = grads.params.get_ids().count();
    let total: usize = grads
        .params
        .get_ids()
        .filter_map(|id| grads.params.get_id(*id).map(|t| t.elem_count()))
        .sum();
    let n_params: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    println!("grad elements {total}, param elements {n_params}");
    println!(
        "remat={remat:?} blocks={blocks} n_seq={s} n_res={r}: VmHWM before {:.1} MiB, after forward {:.1} MiB, after backward {:.1} MiB; {n_grads} grads; {secs:.2} s",
        base as f64 / 1024.0,
        after_fwd as f64 / 1024.0,
        vm_hwm_kib() as f64 / 1024.0
    );
    Ok(())
}
