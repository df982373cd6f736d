//! Parity with OpenFold's data pipeline on three real proteins (`golden/openfold/data/protein_*`).

mod common;

use candle_core::{DType, Device, Tensor};
use common::golden::{Fixture, Report};
use ferrofold::data::structure::parse_structure_file;

fn data_root() -> std::path::PathBuf {
    match std::env::var_os("FERROFOLD_DATA") {
        Some(d) => d.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/proteins"),
    }
}

fn t_f32(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn check_mmcif(name: &str) {
    let fx = Fixture::named("data", name);
    let file = data_root().join(fx.meta["source_file"].as_str().unwrap());
    let chain = fx.meta["chain_auth"].as_str().unwrap();
    let c = parse_structure_file(&file, chain).unwrap();
    let l = c.len();
    let mut r = Report::default();
    let aatype: Vec<i64> = c.aatype.iter().map(|&a| a as i64).collect();
    let want: Vec<i64> = fx.get("mmcif.aatype").to_vec1().unwrap();
    r.checked += 1;
    if aatype != want {
        r.fail(format!("aatype differs:\n{aatype:?}\n{want:?}"));
    }
    // Exact (bitwise) comparison of the f32 coordinates and masks.
    r.check("all_atom_positions", &t_f32(&c.positions, &[l, 37, 3]), &fx.get("mmcif.all_atom_positions"), 0.0, 0.0);
    r.check("all_atom_mask", &t_f32(&c.mask, &[l, 37]), &fx.get("mmcif.all_atom_mask"), 0.0, 0.0);
    let res = fx.get("mmcif.resolution").to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0];
    r.checked += 1;
    if c.resolution.unwrap_or(0.0) != res {
        r.fail(format!("resolution {:?} vs {res}", c.resolution));
    }
    r.checked += 1;
    if c.release_date.as_deref() != fx.meta["release_date"].as_str() {
        r.fail(format!("release date {:?}", c.release_date));
    }
    r.assert_ok(name);
}

#[test]
fn golden_data_mmcif_4zey() {
    check_mmcif("protein_4zey");
}

#[test]
fn golden_data_mmcif_3u8v() {
    check_mmcif("protein_3u8v");
}

#[test]
fn golden_data_mmcif_2q2k() {
    check_mmcif("protein_2q2k");
}

fn check_msa(name: &str) {
    use ferrofold::data::msa::{build_msa, merge, parse_msa_text, read_alignment_dir, MsaFormat};
    let fx = Fixture::named("data", name);
    let seq = fx.meta["sequence"].as_str().unwrap();
    let mut r = Report::default();
    let mut cmp = |what: &str, got_tok: &[u8], got_del: &[u32], rows: usize, width: usize, key: &str| {
        let wt: Vec<Vec<i32>> = fx.get(&format!("{key}.msa")).to_vec2().unwrap();
        let wd: Vec<Vec<i32>> = fx.get(&format!("{key}.deletion_matrix")).to_vec2().unwrap();
        r.checked += 1;
        if wt.len() != rows || wt.first().map_or(0, Vec::len) != width {
            r.fail(format!("{what}: shape [{rows},{width}] vs [{},{}]", wt.len(), wt[0].len()));
            return;
        }
        let ft: Vec<i32> = wt.concat();
        let fd: Vec<i32> = wd.concat();
        let gt: Vec<i32> = got_tok.iter().map(|&v| v as i32).collect();
        let gd: Vec<i32> = got_del.iter().map(|&v| v as i32).collect();
        if gt != ft {
            r.fail(format!("{what}: tokens differ"));
        }
        if gd != fd {
            r.fail(format!("{what}: deletions differ"));
        }
    };
    for m in fx.meta["msas"].as_array().unwrap() {
        let file = data_root().join(m["file"].as_str().unwrap());
        let text = std::fs::read_to_string(&file).unwrap();
        let p = parse_msa_text(&text, &file, MsaFormat::of(file.to_str().unwrap()).unwrap()).unwrap();
        let msa = merge(&[p]);
        let key = format!("msa.{}", m["key"].as_str().unwrap());
        cmp(&key, &msa.tokens, &msa.deletions, msa.rows, msa.width, &key);
    }
    let first = fx.meta["msas"][0]["file"].as_str().unwrap();
    let dir = data_root().join(first).parent().unwrap().to_path_buf();
    let msa = build_msa(&read_alignment_dir(&dir).unwrap(), seq).unwrap();
    cmp("msa_combined", &msa.tokens, &msa.deletions, msa.rows, msa.width, "msa_combined");
    r.assert_ok(name);
}

#[test]
fn golden_data_msa_4zey() {
    check_msa("protein_4zey");
}

#[test]
fn golden_data_msa_3u8v() {
    check_msa("protein_3u8v");
}

#[test]
fn golden_data_msa_2q2k() {
    check_msa("protein_2q2k");
}
