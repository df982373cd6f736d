//! Every sample protein parses, and the chain matches `index.json` (sequence, resolved residues,
//! resolution, release date, method, label chain).

use std::path::PathBuf;

use ferrofold::data::structure::{parse_structure_file, pdb_date_to_iso};

fn data_root() -> PathBuf {
    match std::env::var_os("FERROFOLD_DATA") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/proteins"),
    }
}

fn index() -> serde_json::Value {
    let p = data_root().join("index.json");
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

#[test]
fn data_all_sample_structures_match_index() {
    let idx = index();
    let entries = idx["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 36);
    let mut failures = Vec::new();
    for e in entries {
        let id = e["id"].as_str().unwrap();
        let file = data_root().join(e["file"].as_str().unwrap());
        let chain_id = e["chain_auth"].as_str().unwrap();
        let c = match parse_structure_file(&file, chain_id) {
            Ok(c) => c,
            Err(err) => {
                failures.push(format!("{id}: {err}"));
                continue;
            }
        };
        let mut check = |what: &str, ok: bool, detail: String| {
            if !ok {
                failures.push(format!("{id}: {what}: {detail}"));
            }
        };
        let seq = e["sequence"].as_str().unwrap();
        check(
            "sequence",
            c.sequence == seq,
            format!("\n  got  {}\n  want {seq}", c.sequence),
        );
        let obs = e["observed_residues"].as_u64().unwrap() as usize;
        check(
            "observed",
            c.resolved_residues() == obs,
            format!("{} vs {obs}", c.resolved_residues()),
        );
        let res = e["resolution"].as_f64();
        check(
            "resolution",
            match (res, c.resolution) {
                (None, None) => true,
                (Some(a), Some(b)) => (a - b as f64).abs() <= 0.0051, // index.json rounds to 2 decimals
                _ => false,
            },
            format!("{:?} vs {res:?}", c.resolution),
        );
        let date = e["date"].as_str().unwrap();
        let want_date = if date.len() == 9 {
            pdb_date_to_iso(date).unwrap()
        } else {
            date.to_string()
        };
        check(
            "date",
            c.release_date.as_deref() == Some(&want_date),
            format!("{:?} vs {want_date}", c.release_date),
        );
        let method = e["method"].as_str().unwrap();
        check(
            "method",
            c.method == method,
            format!("{} vs {method}", c.method),
        );
        check(
            "label",
            c.label_chain_id.as_deref() == e["label_asym_id"].as_str(),
            format!("{:?}", c.label_chain_id),
        );
        check("chain", c.chain_id == chain_id, c.chain_id.clone());
        // Masked atoms are zero; resolved residues have N, CA, C where the residue has them.
        let l = c.len();
        check(
            "shape",
            c.positions.len() == l * 37 * 3 && c.mask.len() == l * 37,
            String::new(),
        );
        let bad_zero = (0..l * 37)
            .any(|k| c.mask[k] == 0.0 && c.positions[k * 3..k * 3 + 3].iter().any(|&v| v != 0.0));
        check("masked positions zero", !bad_zero, String::new());
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn data_all_sample_msas_build_with_query_first() {
    use ferrofold::data::alphabet::hhblits_id;
    use ferrofold::data::msa::{build_msa, read_alignment_dir};
    let idx = index();
    let mut n = 0;
    for e in idx["entries"].as_array().unwrap() {
        let msas = e["msas"].as_array().unwrap();
        if msas.is_empty() {
            continue;
        }
        let dir = data_root()
            .join(e["split"].as_str().unwrap())
            .join("alignments")
            .join(e["id"].as_str().unwrap());
        let seq = e["sequence"].as_str().unwrap();
        let files = read_alignment_dir(&dir).unwrap();
        assert_eq!(files.len(), msas.len(), "{}", e["id"]);
        let msa = build_msa(&files, seq).unwrap_or_else(|err| panic!("{}: {err}", e["id"]));
        let q: Vec<u8> = seq.bytes().map(|c| hhblits_id(c).unwrap()).collect();
        assert_eq!(msa.row(0), q.as_slice(), "{}", e["id"]);
        let total: u64 = msas.iter().map(|m| m["n_seqs"].as_u64().unwrap()).sum();
        assert!(msa.rows >= 1 && msa.rows as u64 <= total, "{}", e["id"]);
        n += 1;
    }
    assert_eq!(n, 14);
}

#[test]
fn data_hhr_hits_parse() {
    use ferrofold::data::msa::parse_hhr;
    let p = data_root().join("extra_alignments/pdb70_hits.hhr");
    let hits = parse_hhr(&std::fs::read_to_string(&p).unwrap(), &p).unwrap();
    assert_eq!(hits.len(), 10);
    let h = &hits[0];
    assert_eq!(
        (h.index, h.name.as_str(), h.aligned_cols),
        (1, "1HF9_B", 22)
    );
    assert_eq!(h.query, "AEHHHKAAEHHEQAAKHHHAAA");
    assert_eq!(h.hit_sequence, "ISHHAKEIERLQKEIERHKQSI");
    assert_eq!(h.indices_query[0], 6);
    assert_eq!(h.indices_hit[0], 9);
    assert!((h.sum_probs - 13.1).abs() < 1e-9 && (h.probability - 7.51).abs() < 1e-9);
    for h in &hits {
        assert_eq!(h.query.len(), h.hit_sequence.len(), "{}", h.name);
    }
}
