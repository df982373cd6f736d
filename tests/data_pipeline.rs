//! End-to-end data pipeline: all sample proteins featurise, HDF5 cache round trip, loader over the
//! cache is reproducible, and bad inputs give clear errors that the loader skips and counts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrofold::config::{Config, LoaderConfig, LoaderOrder};
use ferrofold::data::cache::{write_versioned_stub, CacheReader};
use ferrofold::data::command::prepare;
use ferrofold::data::dataset::load_entry;
use ferrofold::data::loader::{Dataset, Loader, LoaderState};
use ferrofold::data::manifest::{manifest_from_index, Manifest};
use ferrofold::data::sample::BATCH_KEYS;
use ferrofold::data::transforms::{build_sample, FeatureConfig};

fn data_root() -> PathBuf {
    match std::env::var_os("FERROFOLD_DATA") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/proteins"),
    }
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ff-data-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn small_cfg() -> (Config, FeatureConfig) {
    let mut c = Config::default();
    c.data.crop_size = 96;
    c.data.max_msa_clusters = 16;
    c.data.max_extra_msa = 32;
    c.model.recycling.max_iters = 1;
    let f = FeatureConfig::from_config(&c);
    (c, f)
}

#[test]
fn data_all_sample_proteins_featurise() {
    let root = data_root();
    let m = Manifest::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/sample.toml"))
        .unwrap();
    let entries = m.check(&root, false).unwrap();
    assert_eq!(entries.len(), 36);
    let (_, f) = small_cfg();
    for (k, e) in entries.iter().enumerate() {
        let (chain, input) = load_entry(&root, e).unwrap_or_else(|err| panic!("{}: {err}", e.id));
        assert_eq!(Some(&chain.sequence), e.sequence.as_ref(), "{}", e.id);
        let s = build_sample(&input, &f, k as u64).unwrap_or_else(|err| panic!("{}: {err}", e.id));
        let keys: Vec<&str> = s.features.keys().map(String::as_str).collect();
        assert_eq!(keys, BATCH_KEYS.to_vec());
        assert_eq!(s.get("msa_feat").unwrap().shape, vec![16, 96, 49, 2]);
        assert_eq!(s.get("extra_msa").unwrap().shape, vec![32, 96, 2]);
        let seq_mask: f32 = s.get("seq_mask").unwrap().as_f32().unwrap().iter().sum();
        assert_eq!(seq_mask as usize, 2 * input.len().min(96), "{}", e.id);
        let msa_feat = s.get("msa_feat").unwrap().as_f32().unwrap();
        assert!(msa_feat.iter().all(|v| v.is_finite()), "{}", e.id);
        let fr = s.get("rigidgroups_gt_frames").unwrap().as_f32().unwrap();
        assert!(fr.iter().all(|v| v.is_finite()), "{}", e.id);
    }
}

#[test]
fn data_cache_roundtrip_and_reproducible_loader() {
    let root = data_root();
    let dir = tmpdir("cache");
    let m = manifest_from_index(&root).unwrap();
    let entries: Vec<_> = m
        .entries
        .iter()
        .filter(|e| ["4zey_A", "3u8v_A", "1psm_A", "1orc_A"].contains(&e.id.as_str()))
        .cloned()
        .collect();
    let out = dir.join("c.h5");
    let st = prepare(&root, &entries, &out, Some(2), false).unwrap();
    assert_eq!((st.written, st.failed.len()), (4, 0));
    let r = CacheReader::open(&out).unwrap();
    for e in &entries {
        let (chain, input) = load_entry(&root, e).unwrap();
        let c = r.read(&e.id).unwrap();
        assert_eq!(c.input, input, "{}", e.id);
        assert_eq!(c.meta.sequence, chain.sequence);
        assert_eq!(c.meta.sources[0].1, e.structure.sha256.clone().unwrap());
    }
    let (cfg, f) = small_cfg();
    let ds = Arc::new(Dataset::from_cache(&out, &cfg.data, None).unwrap());
    let lc = LoaderConfig {
        num_workers: 2,
        prefetch: 3,
        order: LoaderOrder::Deterministic,
    };
    let mut a = Loader::for_dataset(
        ds.clone(),
        &cfg.data,
        f.clone(),
        &lc,
        &LoaderState::default(),
    );
    let sa: Vec<_> = (0..4).map(|_| a.next_sample().unwrap()).collect();
    // A second loader resumed at index 2 rebuilds samples 2 and 3 identically.
    let st = LoaderState {
        watermark: 2,
        ..Default::default()
    };
    let mut b = Loader::for_dataset(ds, &cfg.data, f, &lc, &st);
    assert_eq!(b.next_sample().unwrap(), sa[2]);
    assert_eq!(b.next_sample().unwrap(), sa[3]);
    std::fs::remove_dir_all(&dir).ok();
}

const TINY_CIF: &str = "data_TINY
_entry.id TINY
_exptl.method 'X-RAY DIFFRACTION'
_refine.ls_d_res_high 2.0
loop_
_entity_poly_seq.entity_id
_entity_poly_seq.num
_entity_poly_seq.mon_id
1 1 GLY
1 2 ALA
1 3 SER
loop_
_atom_site.group_PDB
_atom_site.id
_atom_site.type_symbol
_atom_site.label_atom_id
_atom_site.label_alt_id
_atom_site.label_comp_id
_atom_site.label_asym_id
_atom_site.label_entity_id
_atom_site.label_seq_id
_atom_site.Cartn_x
_atom_site.Cartn_y
_atom_site.Cartn_z
_atom_site.occupancy
_atom_site.auth_seq_id
_atom_site.auth_asym_id
_atom_site.pdbx_PDB_model_num
ATOM 1 N N . GLY A 1 1 0.0 0.0 0.0 1.0 1 A 1
ATOM 2 C CA . GLY A 1 1 1.4 0.0 0.0 1.0 1 A 1
ATOM 3 C C . GLY A 1 1 2.0 1.3 0.0 1.0 1 A 1
ATOM 4 N N . ALA A 1 2 3.3 1.4 0.0 1.0 2 A 1
ATOM 5 C CA . ALA A 1 2 4.0 2.6 0.0 1.0 2 A 1
ATOM 6 C C . ALA A 1 2 5.5 2.4 0.0 1.0 2 A 1
ATOM 7 N N . SER A 1 3 6.1 3.5 0.0 1.0 3 A 1
ATOM 8 C CA . SER A 1 3 7.5 3.6 0.0 1.0 3 A 1
";

/// A manifest with the (possibly bad) entry `t_<chain>` from `cif`/`a3m` plus a good entry `g_A`.
fn two_entry_dataset(dir: &Path, cif: &[u8], a3m: &[u8], chain: &str) -> Manifest {
    std::fs::write(dir.join("t.cif"), cif).unwrap();
    std::fs::write(dir.join("t.a3m"), a3m).unwrap();
    std::fs::write(dir.join("g.cif"), TINY_CIF).unwrap();
    std::fs::write(dir.join("g.a3m"), ">q\nGAS\n>h\nGA-\n").unwrap();
    let text = format!(
        "kind = \"sample\"\n\
         [[entries]]\nid = \"t_{chain}\"\nchain = \"{chain}\"\nsplit = \"train\"\n\
         structure = {{ path = \"t.cif\" }}\nalignments = [{{ path = \"t.a3m\" }}]\n\
         [[entries]]\nid = \"g_A\"\nchain = \"A\"\nsplit = \"train\"\n\
         structure = {{ path = \"g.cif\" }}\nalignments = [{{ path = \"g.a3m\" }}]\n"
    );
    std::fs::write(dir.join("m.toml"), text).unwrap();
    Manifest::load(&dir.join("m.toml")).unwrap()
}

/// The entry fails with an error containing every `needles`; a loader over the dataset serves only
/// the good chain and counts the skipped samples.
fn expect_bad(tag: &str, cif: &[u8], a3m: &[u8], chain: &str, needles: &[&str]) {
    let dir = tmpdir(tag);
    let m = two_entry_dataset(&dir, cif, a3m, chain);
    let err = load_entry(&dir, &m.entries[0]).unwrap_err().to_string();
    for n in needles {
        assert!(err.contains(n), "{tag}: `{n}` not in error: {err}");
    }
    let mut cfg = Config::default();
    cfg.data.min_length = 1;
    cfg.data.crop_size = 8;
    cfg.data.max_msa_clusters = 2;
    cfg.data.max_extra_msa = 2;
    cfg.model.recycling.max_iters = 0;
    let f = FeatureConfig::from_config(&cfg);
    let ds = Arc::new(Dataset::from_manifest(&dir, &m, &cfg.data, None).unwrap());
    let lc = LoaderConfig {
        num_workers: 2,
        prefetch: 4,
        order: LoaderOrder::Deterministic,
    };
    let mut l = Loader::for_dataset(ds, &cfg.data, f, &lc, &LoaderState::default());
    for _ in 0..12 {
        assert_eq!(l.next_sample().unwrap().id, "g_A");
    }
    let st = l.state();
    assert!(st.skipped > 0, "{tag}: nothing skipped");
    assert_eq!(st.served, 12);
    assert!(
        l.skipped_errors()
            .iter()
            .all(|e| needles.iter().all(|n| e.contains(n))),
        "{tag}: {:?}",
        l.skipped_errors()
    );
    drop(l);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn data_bad_truncated_mmcif() {
    let cut = TINY_CIF.len() - 20; // inside the last atom_site row
    expect_bad(
        "trunc",
        &TINY_CIF.as_bytes()[..cut],
        b">q\nGAS\n",
        "A",
        &["t.cif:", "incomplete row"],
    );
}

#[test]
fn data_bad_missing_chain() {
    expect_bad(
        "chain",
        TINY_CIF.as_bytes(),
        b">q\nGAS\n",
        "Z",
        &["t.cif", "chain `Z` not found", "[A]"],
    );
}

#[test]
fn data_bad_msa_query_mismatch() {
    expect_bad(
        "query",
        TINY_CIF.as_bytes(),
        b">q\nGAA\n",
        "A",
        &["t.a3m", "differs from the chain sequence"],
    );
}

#[test]
fn data_bad_empty_msa() {
    expect_bad(
        "empty",
        TINY_CIF.as_bytes(),
        b"",
        "A",
        &["t.a3m", "empty MSA"],
    );
}

#[test]
fn data_bad_non_utf8() {
    let mut bytes = TINY_CIF.as_bytes().to_vec();
    bytes[30] = 0xff; // line 3
    expect_bad(
        "utf8",
        &bytes,
        b">q\nGAS\n",
        "A",
        &["t.cif:3", "invalid UTF-8"],
    );
}

#[test]
fn data_bad_cache_version() {
    let dir = tmpdir("ver");
    let p = dir.join("old.h5");
    write_versioned_stub(&p, 999).unwrap();
    let err = CacheReader::open(&p).err().unwrap().to_string();
    assert!(
        err.contains("old.h5")
            && err.contains("version 999")
            && err.contains("ferrofold data prepare"),
        "{err}"
    );
    let (cfg, _) = small_cfg();
    assert!(Dataset::from_cache(&p, &cfg.data, None).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

/// The OpenFold layout (`<pdb>_<chain>/` directories, or an alignment_db) gives the same inputs as
/// the sample layout.
#[test]
fn data_openfold_layout_and_alignment_db() {
    use ferrofold::data::alignment_db::AlignmentDb;
    let root = data_root();
    let dir = tmpdir("oflayout");
    std::fs::create_dir_all(dir.join("mmcif")).unwrap();
    std::fs::create_dir_all(dir.join("alignments/4zey_A")).unwrap();
    std::fs::copy(root.join("train/4zey.cif"), dir.join("mmcif/4zey.cif")).unwrap();
    let mut files = Vec::new();
    for f in [
        "bfd_uniclust_hits.a3m",
        "mgnify_hits.sto",
        "uniref90_hits.sto",
    ] {
        let bytes = std::fs::read(root.join("train/alignments/4zey").join(f)).unwrap();
        std::fs::write(dir.join("alignments/4zey_A").join(f), &bytes).unwrap();
        files.push((f.to_string(), bytes));
    }
    files.reverse(); // shard order must not matter
    AlignmentDb::write(
        &dir.join("db"),
        "shard0.db",
        "index.json",
        &[("4zey_A".to_string(), files)],
    )
    .unwrap();
    let sample = manifest_from_index(&root).unwrap();
    let e = sample.entries.iter().find(|e| e.id == "4zey_A").unwrap();
    let (_, want) = load_entry(&root, e).unwrap();
    for layout in [
        "alignment_dir = \"alignments\"",
        "alignment_db_index = \"db/index.json\"",
    ] {
        let text = format!("kind = \"openfold\"\n[openfold]\nmmcif_dir = \"mmcif\"\n{layout}\nchains = [\"4zey_A\"]\n");
        let m: Manifest = toml::from_str(&text).unwrap();
        let entries = m.check(&dir, false).unwrap();
        assert_eq!(entries.len(), 1);
        let (_, got) = load_entry(&dir, &entries[0]).unwrap();
        assert_eq!(got, want, "{layout}");
    }
    // Chains discovered from the directory names when `chains` is empty.
    let m: Manifest = toml::from_str(
        "kind = \"openfold\"\n[openfold]\nmmcif_dir = \"mmcif\"\nalignment_dir = \"alignments\"\n",
    )
    .unwrap();
    assert_eq!(m.resolve_entries(&dir).unwrap()[0].id, "4zey_A");
    // Missing files are all listed.
    let m: Manifest = toml::from_str("kind = \"openfold\"\n[openfold]\nmmcif_dir = \"nope\"\nalignment_dir = \"alignments\"\nchains = [\"4zey_A\", \"1abc_B\"]\n").unwrap();
    let err = m.check(&dir, false).unwrap_err().to_string();
    assert!(
        err.contains("nope/4zey.cif")
            && err.contains("nope/1abc.cif")
            && err.contains("alignments/1abc_B"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `ferrofold data prepare` + `inspect` through the binary.
#[test]
fn data_cli_prepare_and_inspect() {
    let dir = tmpdir("cli");
    let root = data_root();
    let mut m = manifest_from_index(&root).unwrap();
    m.entries
        .retain(|e| ["2q2k_A", "6mrr_A"].contains(&e.id.as_str()));
    m.save(&dir.join("m.toml")).unwrap();
    let bin = env!("CARGO_BIN_EXE_ferrofold");
    let out = std::process::Command::new(bin)
        .args(["data", "prepare", "--quiet", "--data-root"])
        .arg(&root)
        .arg("--manifest")
        .arg(dir.join("m.toml"))
        .arg("--out")
        .arg(dir.join("c.h5"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("2 chains (0 skipped)"), "{text}");
    let out = std::process::Command::new(bin)
        .args(["data", "inspect", "--chains"])
        .arg(dir.join("c.h5"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success()
            && text.contains("2 chains")
            && text.contains("2q2k_A")
            && text.contains("resolved=45"),
        "{text}"
    );
    // Missing data root: a clear error listing what is missing.
    let out = std::process::Command::new(bin)
        .args(["data", "check", "--data-root"])
        .arg(dir.join("nowhere"))
        .arg("--manifest")
        .arg(dir.join("m.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && text.contains("nowhere"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `Dataset::from_config` reads the manifest under the data root, keeps one split, applies
/// `max_msa_seqs`, and its sampler draws every chain.
#[test]
fn data_dataset_from_config_split_and_msa_cap() {
    let mut cfg = Config::default();
    cfg.data.data_root = Some(data_root());
    cfg.data.manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/sample.toml");
    cfg.data.max_msa_seqs = 5;
    let ds = Dataset::from_config(&cfg.data, Some("val")).unwrap();
    let mut ids: Vec<&str> = ds.items().iter().map(|i| i.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, vec!["102m_A", "1aki_A", "3o5r_A", "3u8v_A", "5zyh_A"]);
    let i = ds.items().iter().position(|i| i.id == "3u8v_A").unwrap();
    let input = ds.load(i, &cfg.data).unwrap();
    assert_eq!(input.msa.rows, 5);
    let mut seen = std::collections::BTreeSet::new();
    for k in 0..200 {
        seen.insert(ds.pick(1, k));
    }
    assert_eq!(seen.len(), 5);
    // The training split drops nothing from the sample (all pass the filters).
    let train = Dataset::from_config(&cfg.data, Some("train")).unwrap();
    assert_eq!((train.len(), train.filtered.len()), (31, 0));
}
