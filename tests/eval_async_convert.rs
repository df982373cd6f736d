//! OpenFold → ferrofold weight conversion end to end: the golden tiny model's OpenFold parameters
//! (`model/alphafold_model`) are written as a real PyTorch checkpoint (a `torch.save` zip archive:
//! `archive/data.pkl` pickling `{"state_dict": OrderedDict(name -> _rebuild_tensor_v2(...)),
//! "epoch": 3}` with persistent storages in `archive/data/<key>`, written here without torch),
//! converted with `ferrofold convert-weights`, loaded with `train --init-from`, and the weights of
//! the resulting checkpoint are compared with the fixture. Wrong configurations and JAX `.npz`
//! files fail with clear errors.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use common::data::manifest_subset;
use common::golden::Fixture;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferrofold")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ff-convert-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(repo())
        .output()
        .expect("spawn ferrofold")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// ---- a minimal pickle (protocol 2) writer for torch state dicts ----

struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Self {
        Pickle(vec![0x80, 2])
    }
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: usize) {
        self.0.push(b'J');
        self.0.extend_from_slice(&(v as i32).to_le_bytes());
    }
    fn op(&mut self, b: u8) {
        self.0.push(b);
    }
    fn int_tuple(&mut self, v: &[usize]) {
        self.op(b'(');
        for x in v {
            self.int(*x);
        }
        self.op(b't');
    }
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R');
    }
    /// `torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())` with a
    /// persistent `("storage", torch.DoubleStorage, key, "cpu", numel)`.
    fn tensor(&mut self, key: &str, shape: &[usize]) {
        let numel: usize = shape.iter().product();
        let mut stride = vec![1usize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1];
        }
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.op(b'(');
        self.op(b'(');
        self.str("storage");
        self.global("torch", "DoubleStorage");
        self.str(key);
        self.str("cpu");
        self.int(numel);
        self.op(b't');
        self.op(b'Q'); // BINPERSID
        self.int(0);
        self.int_tuple(shape);
        self.int_tuple(&stride);
        self.op(0x89); // False
        self.ordered_dict();
        self.op(b't');
        self.op(b'R');
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A zip archive of stored (uncompressed) entries.
fn zip_stored(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    let u16le = |v: &mut Vec<u8>, x: u16| v.extend_from_slice(&x.to_le_bytes());
    let u32le = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
    for (name, data) in entries {
        let offset = out.len() as u32;
        let crc = crc32(data);
        u32le(&mut out, 0x0403_4b50);
        for x in [20u16, 0, 0, 0, 0x21] {
            u16le(&mut out, x); // version, flags, stored, time, date (1980-01-01)
        }
        for x in [crc, data.len() as u32, data.len() as u32] {
            u32le(&mut out, x);
        }
        u16le(&mut out, name.len() as u16);
        u16le(&mut out, 0);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);

        u32le(&mut central, 0x0201_4b50);
        for x in [20u16, 20, 0, 0, 0, 0x21] {
            u16le(&mut central, x);
        }
        for x in [crc, data.len() as u32, data.len() as u32] {
            u32le(&mut central, x);
        }
        u16le(&mut central, name.len() as u16);
        for x in [0u16, 0, 0, 0] {
            u16le(&mut central, x); // extra, comment, disk, internal attrs
        }
        u32le(&mut central, 0); // external attrs
        u32le(&mut central, offset);
        central.extend_from_slice(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    let cd_size = central.len() as u32;
    out.extend_from_slice(&central);
    u32le(&mut out, 0x0605_4b50);
    for x in [0u16, 0, entries.len() as u16, entries.len() as u16] {
        u16le(&mut out, x);
    }
    u32le(&mut out, cd_size);
    u32le(&mut out, cd_offset);
    u16le(&mut out, 0);
    out
}

/// Write `params` (f64) as a Lightning-style torch checkpoint with `prefix` on every name.
fn write_torch_checkpoint(path: &Path, params: &BTreeMap<String, Tensor>, prefix: &str) {
    let mut p = Pickle::new();
    let mut files = Vec::new();
    p.op(b'}');
    p.op(b'(');
    p.str("state_dict");
    p.ordered_dict();
    p.op(b'(');
    for (i, (name, t)) in params.iter().enumerate() {
        let key = i.to_string();
        p.str(&format!("{prefix}{name}"));
        p.tensor(&key, t.dims());
        let bytes: Vec<u8> = t
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        files.push((format!("archive/data/{key}"), bytes));
    }
    p.op(b'u'); // state_dict items
    p.str("epoch");
    p.int(3);
    p.op(b'u'); // top-level items
    p.op(b'.');
    let mut entries = vec![("archive/data.pkl".to_string(), p.0)];
    entries.extend(files);
    entries.push(("archive/version".to_string(), b"3\n".to_vec()));
    std::fs::write(path, zip_stored(&entries)).unwrap();
}

fn read_st(path: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn assert_equal_f32(got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, w) in want {
        let g = &got[k];
        assert_eq!(g.dtype(), DType::F32, "{k}");
        assert_eq!(g.dims(), w.dims(), "{k}");
        let a: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = w
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{k} differs"
        );
    }
}

const TINY: [&str; 4] = [
    "--config",
    "configs/base.toml",
    "--config",
    "configs/tiny.toml",
];

#[test]
fn eval_async_convert_openfold_pt_then_init_from() {
    let d = tmp("ok");
    let fx = Fixture::named("model", "alphafold_model");
    let params = fx.params(DType::F64);
    assert!(params.len() > 100, "{} params", params.len());
    let pt = d.join("openfold.pt");
    write_torch_checkpoint(&pt, &params, "model.");
    let out = d.join("converted.safetensors");
    let o = run(&[
        &["convert-weights", "--from", pt.to_str().unwrap()],
        &["--key", "state_dict", "--out", out.to_str().unwrap()][..],
        &TINY[..],
    ]
    .concat());
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("wrote {} tensors", params.len())),
        "{}",
        text(&o)
    );
    let converted = read_st(&out);
    assert_equal_f32(&converted, &params);

    // Fine-tune start: the weights land in the model unchanged (checkpoint of step 0).
    let manifest = manifest_subset(&d, &["2q2k_A"]);
    let run_dir = d.join("run");
    let manifest_set = format!("data.manifest=\"{}\"", manifest.display());
    let o = run(&[
        &[
            "train",
            "--init-from",
            out.to_str().unwrap(),
            "--stop-at",
            "0",
        ][..],
        &TINY[..],
        &[
            "--set",
            &manifest_set,
            "--set",
            "train.eval_every=0",
            "--set",
            "log.progress=\"never\"",
            "--run-dir",
            run_dir.to_str().unwrap(),
        ],
    ]
    .concat());
    assert!(o.status.success(), "{}", text(&o));
    let loaded = read_st(&run_dir.join("ckpt-000000000/model.safetensors"));
    assert_equal_f32(&loaded, &params);
}

#[test]
fn eval_async_convert_rejects_wrong_model_and_npz() {
    let d = tmp("bad");
    let fx = Fixture::named("model", "alphafold_model");
    let mut params = fx.params(DType::F64);
    // One unknown name, one missing parameter.
    let (first, t) = params.pop_first().unwrap();
    params.insert("not_a_param.weight".into(), t);
    let pt = d.join("openfold.pt");
    write_torch_checkpoint(&pt, &params, "module.model.");
    let out = d.join("w.safetensors");
    let o = run(&[
        &["convert-weights", "--from", pt.to_str().unwrap()],
        &["--key", "state_dict", "--out", out.to_str().unwrap()][..],
        &TINY[..],
    ]
    .concat());
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains(&first)
            && t.contains("not_a_param.weight")
            && t.contains("1 missing, 1 unknown"),
        "{t}"
    );
    assert!(!out.exists(), "nothing may be written");
    // The full-size model of base.toml: shapes differ.
    let o = run(&[
        "convert-weights",
        "--from",
        pt.to_str().unwrap(),
        "--key",
        "state_dict",
        "--out",
        out.to_str().unwrap(),
        "--config",
        "configs/base.toml",
    ]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("shape mismatch"), "{t}");
    // Without the key the top-level dict holds no tensors.
    let o = run(&[
        "convert-weights",
        "--from",
        pt.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("--key state_dict"), "{t}");
    let o = run(&[
        "convert-weights",
        "--from",
        "params_model_1.npz",
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("not supported"), "{t}");
}
