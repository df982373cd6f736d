//! EvoformerBlock forward and forward+backward on CPU, f32.
//!
//! `cargo bench --bench evoformer -- --measurement-time 5 --warm-up-time 1`
//! Peak memory with/without remat: `cargo run --release --example evo_memory -- --help`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use ferrofold::config::StackConfig;
use ferrofold::model::evoformer::{BlockConfig, EvoformerBlock};
use ferrofold::model::remat::vjp_loss;

struct Case {
    name: &'static str,
    n_seq: usize,
    n_res: usize,
    cfg: BlockConfig,
}

fn af2_config() -> BlockConfig {
    BlockConfig {
        c_m: 256,
        c_z: 128,
        stack: StackConfig::evoformer(),
        inf: 1e9,
        eps_opm: 1e-3,
        eps_global: 1e-8,
        backward: ferrofold::config::TrunkBackward::Manual,
    }
}

fn small_config() -> BlockConfig {
    BlockConfig {
        c_m: 32,
        c_z: 16,
        stack: StackConfig {
            num_blocks: 1,
            c_hidden_msa_att: 8,
            no_heads_msa: 4,
            c_hidden_opm: 8,
            c_hidden_mul: 16,
            c_hidden_pair_att: 8,
            no_heads_pair: 2,
            transition_n: 4,
            msa_dropout: 0.15,
            pair_dropout: 0.25,
        },
        ..af2_config()
    }
}

fn bench_block(c: &mut Criterion) {
    let dev = Device::Cpu;
    let cases = [
        Case {
            name: "small_s8_r16",
            n_seq: 8,
            n_res: 16,
            cfg: small_config(),
        },
        Case {
            name: "af2_s32_r64",
            n_seq: 32,
            n_res: 64,
            cfg: af2_config(),
        },
    ];
    for case in cases {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let block = EvoformerBlock::new(vb, &case.cfg).expect("block");
        let (s, r) = (case.n_seq, case.n_res);
        let m = Tensor::randn(0f32, 1.0, (s, r, case.cfg.c_m), &dev).expect("m");
        let z = Tensor::randn(0f32, 1.0, (r, r, case.cfg.c_z), &dev).expect("z");
        let mm = Tensor::ones((s, r), DType::F32, &dev).expect("mask");
        let pm = Tensor::ones((r, r), DType::F32, &dev).expect("mask");
        let gm = Tensor::randn(0f32, 1.0, (s, r, case.cfg.c_m), &dev).expect("gm");
        let gz = Tensor::randn(0f32, 1.0, (r, r, case.cfg.c_z), &dev).expect("gz");
        let mut group = c.benchmark_group(format!("evoformer_block/{}", case.name));
        group.sample_size(10);
        group.bench_function("forward", |b| {
            b.iter(|| block.forward(&m, &z, &mm, &pm, None).expect("fwd"))
        });
        group.bench_function("forward_backward", |b| {
            b.iter(|| {
                let (mo, zo) = block.forward(&m, &z, &mm, &pm, None).expect("fwd");
                vjp_loss(&[(&mo, &gm), (&zo, &gz)])
                    .expect("loss")
                    .backward()
                    .expect("bwd")
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench_block);
criterion_main!(benches);
