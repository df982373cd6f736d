//! Property tests of the losses and metrics: invariances and exact recoveries.

mod common;

use candle_core::{DType, Device, Tensor};
use ferrofold::geometry::superimpose::{kabsch, quat_to_matrix, superimpose};
use ferrofold::loss::{self, metrics};

/// Deterministic xorshift64* stream of N(0,1)-ish numbers (sum of uniforms).
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        (0..12).map(|_| self.uniform()).sum::<f64>() - 6.0
    }
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
    fn rotation(&mut self) -> [[f64; 3]; 3] {
        let q: Vec<f64> = self.vec(4, 1.0);
        let n = q.iter().map(|v| v * v).sum::<f64>().sqrt();
        quat_to_matrix([q[0] / n, q[1] / n, q[2] / n, q[3] / n])
    }
}

fn t(v: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn mat(r: [[f64; 3]; 3]) -> Tensor {
    t(r.iter().flatten().copied().collect(), &[3, 3])
}

/// Rotate points [*, 3] by `q` and shift by `s`: x' = Q x + s.
fn move_points(x: &Tensor, q: &Tensor, s: &Tensor) -> Tensor {
    x.broadcast_matmul(&q.t().unwrap())
        .unwrap()
        .broadcast_add(s)
        .unwrap()
}

/// Compose frames [F,3,3] with a global motion: R' = Q R.
fn move_rots(r: &Tensor, q: &Tensor) -> Tensor {
    q.broadcast_matmul(r).unwrap()
}

fn scalar(x: &Tensor) -> f64 {
    x.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

struct FapeCase {
    pr: Tensor,
    pt: Tensor,
    tr: Tensor,
    tt: Tensor,
    fm: Tensor,
    pp: Tensor,
    tp: Tensor,
    pm: Tensor,
}

fn fape_case(rng: &mut Rng) -> FapeCase {
    let (f, p) = (7, 12);
    let rots = |rng: &mut Rng| {
        let v: Vec<f64> = (0..f)
            .flat_map(|_| rng.rotation().into_iter().flatten())
            .collect();
        t(v, &[f, 3, 3])
    };
    let mask = |rng: &mut Rng, n: usize| {
        t(
            (0..n)
                .map(|_| if rng.uniform() < 0.8 { 1.0 } else { 0.0 })
                .collect(),
            &[n],
        )
    };
    FapeCase {
        pr: rots(rng),
        pt: t(rng.vec(f * 3, 8.0), &[f, 3]),
        tr: rots(rng),
        tt: t(rng.vec(f * 3, 8.0), &[f, 3]),
        fm: mask(rng, f),
        pp: t(rng.vec(p * 3, 8.0), &[p, 3]),
        tp: t(rng.vec(p * 3, 8.0), &[p, 3]),
        pm: mask(rng, p),
    }
}

fn fape(c: &FapeCase, clamp: Option<f64>) -> f64 {
    scalar(
        &loss::compute_fape(
            &c.pr, &c.pt, &c.tr, &c.tt, &c.fm, &c.pp, &c.tp, &c.pm, 10.0, clamp, None, 1e-4,
        )
        .unwrap(),
    )
}

#[test]
fn fape_invariant_to_global_rigid_motion() {
    let mut rng = Rng(0x9E3779B97F4A7C15);
    for _ in 0..5 {
        let c = fape_case(&mut rng);
        for clamp in [Some(10.0), None] {
            let base = fape(&c, clamp);
            assert!(base > 0.0);
            let q = mat(rng.rotation());
            let s = t(rng.vec(3, 20.0), &[3]);
            // motion of the prediction only (frames + positions together)
            let moved_pred = FapeCase {
                pr: move_rots(&c.pr, &q),
                pt: move_points(&c.pt, &q, &s),
                pp: move_points(&c.pp, &q, &s),
                ..fape_case_clone(&c)
            };
            let a = fape(&moved_pred, clamp);
            assert!(
                (a - base).abs() <= 1e-12 * base.abs().max(1.0),
                "pred motion {a} vs {base}"
            );
            // motion of the target only
            let moved_target = FapeCase {
                tr: move_rots(&c.tr, &q),
                tt: move_points(&c.tt, &q, &s),
                tp: move_points(&c.tp, &q, &s),
                ..fape_case_clone(&c)
            };
            let b = fape(&moved_target, clamp);
            assert!(
                (b - base).abs() <= 1e-12 * base.abs().max(1.0),
                "target motion {b} vs {base}"
            );
            // moving only the positions (not the frames) must change it: the test can fail
            let broken = FapeCase {
                pp: move_points(&c.pp, &q, &s),
                ..fape_case_clone(&c)
            };
            assert!((fape(&broken, clamp) - base).abs() > 1e-6);
        }
    }
}

fn fape_case_clone(c: &FapeCase) -> FapeCase {
    FapeCase {
        pr: c.pr.clone(),
        pt: c.pt.clone(),
        tr: c.tr.clone(),
        tt: c.tt.clone(),
        fm: c.fm.clone(),
        pp: c.pp.clone(),
        tp: c.tp.clone(),
        pm: c.pm.clone(),
    }
}

#[test]
fn fape_zero_for_identical_structures() {
    let mut rng = Rng(7);
    let c = fape_case(&mut rng);
    let same = FapeCase {
        tr: c.pr.clone(),
        tt: c.pt.clone(),
        tp: c.pp.clone(),
        ..fape_case_clone(&c)
    };
    // error = sqrt(0 + eps) = 0.01 Å per pair -> 0.001 after the 10 Å unit
    let v = fape(&same, Some(10.0));
    assert!((v - 1e-3).abs() < 1e-6, "{v}");
}

/// A chain-like atom37 structure: Cα on a random walk with 3.8 Å steps, other atoms random.
fn atom37(rng: &mut Rng, n: usize) -> (Tensor, Tensor) {
    let mut pos = vec![0.0; n * 37 * 3];
    let mut ca = [0.0f64; 3];
    for i in 0..n {
        let d = rng.vec(3, 1.0);
        let norm = d.iter().map(|v| v * v).sum::<f64>().sqrt();
        for k in 0..3 {
            ca[k] += 3.8 * d[k] / norm;
        }
        for a in 0..37 {
            for k in 0..3 {
                pos[(i * 37 + a) * 3 + k] = ca[k] + if a == 1 { 0.0 } else { rng.normal() * 1.5 };
            }
        }
    }
    let mask: Vec<f64> = (0..n * 37)
        .map(|i| if i % 37 == 1 && i / 37 == 3 { 0.0 } else { 1.0 })
        .collect();
    (t(pos, &[n, 37, 3]), t(mask, &[n, 37]))
}

#[test]
fn lddt_is_one_for_identical_and_invariant_to_rigid_motion() {
    let mut rng = Rng(42);
    let n = 20;
    let (x, m) = atom37(&mut rng, n);
    let l = scalar(&loss::lddt_ca(&x, &x, &m, 15.0, 1e-10, false).unwrap());
    assert!((l - 1.0).abs() < 1e-12, "{l}");
    let per = loss::lddt_ca(&x, &x, &m, 15.0, 1e-10, true)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(per.iter().all(|v| (v - 1.0).abs() < 1e-9), "{per:?}");
    // a perturbed prediction scores < 1, and the same value after any rigid motion
    let noisy = (&x + t(rng.vec(n * 37 * 3, 1.0), &[n, 37, 3])).unwrap();
    let base = scalar(&loss::lddt_ca(&noisy, &x, &m, 15.0, 1e-10, false).unwrap());
    assert!(base < 0.95, "{base}");
    let q = mat(rng.rotation());
    let s = t(rng.vec(3, 30.0), &[3]);
    let moved = move_points(&noisy.reshape((n * 37, 3)).unwrap(), &q, &s)
        .reshape((n, 37, 3))
        .unwrap();
    let after = scalar(&loss::lddt_ca(&moved, &x, &m, 15.0, 1e-10, false).unwrap());
    assert!((after - base).abs() < 1e-12, "{after} vs {base}");
}

#[test]
#[allow(clippy::needless_range_loop)]
fn kabsch_recovers_known_motion_on_tensors() {
    let mut rng = Rng(3);
    let n = 15;
    let x = t(rng.vec(n * 3, 6.0), &[n, 3]);
    let r = rng.rotation();
    let s = rng.vec(3, 10.0);
    let y = move_points(&x, &mat(r), &t(s.clone(), &[3]));
    let pts = |a: &Tensor| -> Vec<[f64; 3]> {
        a.to_vec2::<f64>()
            .unwrap()
            .into_iter()
            .map(|v| [v[0], v[1], v[2]])
            .collect()
    };
    let sup = kabsch(&pts(&y), &pts(&x)).unwrap();
    for i in 0..3 {
        for j in 0..3 {
            assert!((sup.rot[i][j] - r[i][j]).abs() < 1e-10);
        }
        assert!((sup.trans[i] - s[i]).abs() < 1e-9);
    }
    assert!(sup.rmsd < 1e-9);
}

#[test]
fn rmsd_zero_after_superposing_rotated_copy_and_metrics() {
    let mut rng = Rng(11);
    let n = 18;
    let x = t(rng.vec(2 * n * 3, 6.0), &[2, n, 3]);
    let q = mat(rng.rotation());
    let s = t(rng.vec(3, 10.0), &[3]);
    let y = move_points(&x.reshape((2 * n, 3)).unwrap(), &q, &s)
        .reshape((2, n, 3))
        .unwrap();
    let mask = t(
        (0..2 * n)
            .map(|i| if i % 7 == 3 { 0.0 } else { 1.0 })
            .collect(),
        &[2, n],
    );
    let (sup, rmsd) = superimpose(&x, &y, &mask).unwrap();
    for v in rmsd.to_vec1::<f64>().unwrap() {
        assert!(v < 1e-9, "rmsd {v}");
    }
    // superposed copy equals the reference where masked in, 0 elsewhere
    let want = x.broadcast_mul(&mask.unsqueeze(2).unwrap()).unwrap();
    let diff = (sup - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    assert!(scalar(&diff) < 1e-9);
    // noisy copy: positive RMSD; GDT and dRMSD behave
    let noisy = (&x + t(rng.vec(2 * n * 3, 0.7), &[2, n, 3])).unwrap();
    let (_, r2) = superimpose(&x, &noisy, &mask).unwrap();
    assert!(r2.to_vec1::<f64>().unwrap().iter().all(|&v| v > 0.1));
    let x0 = x.get(0).unwrap();
    let m0 = mask.get(0).unwrap();
    assert!((scalar(&metrics::gdt_ts(&x0, &x0, &m0).unwrap()) - 1.0).abs() < 1e-12);
    assert!((scalar(&metrics::gdt_ha(&x0, &x0, &m0).unwrap()) - 1.0).abs() < 1e-12);
    assert!(scalar(&metrics::drmsd(&x0, &x0, Some(&m0)).unwrap()).abs() < 1e-12);
    let y0 = y.get(0).unwrap();
    assert!(scalar(&metrics::drmsd(&x0, &y0, Some(&m0)).unwrap()).abs() < 1e-9);
}

#[test]
fn structure_metrics_perfect_prediction() {
    let mut rng = Rng(5);
    let n = 16;
    let (x, m) = atom37(&mut rng, n);
    let q = mat(rng.rotation());
    let s = t(rng.vec(3, 10.0), &[3]);
    let moved = move_points(&x.reshape((n * 37, 3)).unwrap(), &q, &s)
        .reshape((n, 37, 3))
        .unwrap();
    let sm = metrics::structure_metrics(&moved, &x, &m).unwrap();
    assert!((sm.lddt_ca - 1.0).abs() < 1e-9, "{sm:?}");
    assert!(sm.rmsd_ca < 1e-8 && sm.drmsd_ca < 1e-8, "{sm:?}");
    assert!(
        (sm.gdt_ts - 1.0).abs() < 1e-12 && (sm.gdt_ha - 1.0).abs() < 1e-12,
        "{sm:?}"
    );
}

#[test]
fn single_residue_violations_are_within_residue_only() {
    use ferrofold::config::ViolationConfig;
    use ferrofold::loss::LossTables;
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/stereo_chemical_props.txt");
    let path = std::env::var_os("FERROFOLD_STEREO_PROPS")
        .map(std::path::PathBuf::from)
        .unwrap_or(path);
    if !path.exists() {
        // the golden tests locate the file the same way and fail loudly if it is missing
        eprintln!("skip: no {}", path.display());
        return;
    }
    let tables = LossTables::load(&path, &ViolationConfig::default(), &Device::Cpu).unwrap();
    let mut rng = Rng(9);
    // ALA (restype 0): 5 atoms; all squeezed into a 0.3 Å ball -> within-residue violations
    let pos = t(rng.vec(14 * 3, 0.1), &[1, 14, 3]);
    let exists = t(
        (0..14).map(|i| if i < 5 { 1.0 } else { 0.0 }).collect(),
        &[1, 14],
    );
    let ri = Tensor::new(&[0i64], &Device::Cpu).unwrap();
    let aa = Tensor::new(&[0i64], &Device::Cpu).unwrap();
    let to37 = Tensor::new(
        &[[0i64, 1, 2, 4, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let v = loss::find_structural_violations(
        &pos,
        &exists,
        &ri,
        &aa,
        &to37,
        &tables.violation,
        12.0,
        1.5,
    )
    .unwrap();
    assert_eq!(scalar(&v.bonds_c_n_loss_mean), 0.0);
    assert_eq!(scalar(&v.clashes_mean_loss), 0.0);
    let within = v.within_per_atom_loss_sum.sum_all().unwrap();
    assert!(scalar(&within) > 1.0);
    let l = loss::violation_loss(&v, &exists, false, 1e-8).unwrap();
    assert!((scalar(&l) - scalar(&within) / (5.0 + 1e-8)).abs() < 1e-9);
}
