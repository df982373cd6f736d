//! `ferrofold plot RUN_DIR`: PNG curves from `metrics.jsonl` (plotters, bitmap backend): the loss
//! and its terms, evaluation metrics (lDDT-Cα ...), learning rate and gradient norm.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::error::{Error, Result};
use crate::train::metrics::METRICS_FILE;

/// Named series of (step, value) points.
pub type Series = BTreeMap<String, Vec<(f64, f64)>>;

/// Curves read from a metrics log.
#[derive(Debug, Default)]
pub struct Curves {
    /// `loss` and every `terms.*` of train lines.
    pub loss: Series,
    /// Every metric of eval lines.
    pub eval: Series,
    /// `lr` and `grad_norm`.
    pub optim: Series,
}

/// Parse `metrics.jsonl` text (non-finite values are `null` and skipped).
pub fn read_curves(text: &str, path: &Path) -> Result<Curves> {
    let mut c = Curves::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::parse(path, i + 1, format!("not a JSON object: {e}")))?;
        let step = v["step"]
            .as_f64()
            .ok_or_else(|| Error::parse(path, i + 1, "missing `step`"))?;
        let push = |series: &mut Series, name: &str, val: &serde_json::Value| {
            if let Some(x) = val.as_f64().filter(|x| x.is_finite()) {
                series.entry(name.to_string()).or_default().push((step, x));
            }
        };
        match v["kind"].as_str() {
            Some("train") => {
                push(&mut c.loss, "loss", &v["loss"]);
                if let Some(terms) = v["terms"].as_object() {
                    for (k, x) in terms {
                        push(&mut c.loss, k, x);
                    }
                }
                push(&mut c.optim, "lr", &v["lr"]);
                push(&mut c.optim, "grad_norm", &v["grad_norm"]);
            }
            Some("eval") => {
                if let Some(m) = v["metrics"].as_object() {
                    for (k, x) in m {
                        push(&mut c.eval, k, x);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(c)
}

/// Trailing moving average over `w` points (same length as the input).
pub fn moving_average(v: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    let w = w.max(1);
    let mut sum = 0.0;
    v.iter()
        .enumerate()
        .map(|(i, p)| {
            sum += p.1;
            if i >= w {
                sum -= v[i - w].1;
            }
            (p.0, sum / (i + 1).min(w) as f64)
        })
        .collect()
}

/// Fonts plotters can use: DejaVu Sans from the usual system places (`fonts-dejavu-core`), or the
/// file in `FERROFOLD_FONT`.
fn load_font() -> Result<()> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("FERROFOLD_FONT") {
        candidates.push(PathBuf::from(p));
    }
    candidates.extend(
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
        ]
        .map(PathBuf::from),
    );
    for p in &candidates {
        if let Ok(bytes) = std::fs::read(p) {
            // plotters keeps the font for the process lifetime.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Ok(());
            }
        }
    }
    Err(Error::Msg(
        "plot: no TrueType font found (install fonts-dejavu-core or set FERROFOLD_FONT=/path/font.ttf)"
            .into(),
    ))
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("plot {}: {e}", path.display()))
}

/// Draw one chart of several series; `log_y` for losses spanning decades.
fn draw(path: &Path, title: &str, all: &Series, log_y: bool) -> Result<()> {
    // A log axis cannot show zeros (e.g. a term with weight 0 on some steps).
    let positive: Series;
    let series = if log_y {
        positive = all
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.iter().copied().filter(|p| p.1 > 0.0).collect::<Vec<_>>(),
                )
            })
            .filter(|(_, v)| !v.is_empty())
            .collect();
        &positive
    } else {
        all
    };
    let pts: Vec<(f64, f64)> = series.values().flatten().copied().collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let colors = [
        BLUE,
        RED,
        GREEN,
        MAGENTA,
        CYAN,
        BLACK,
        RGBColor(255, 140, 0),
        RGBColor(120, 60, 20),
    ];
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("step")
                .draw()
                .map_err(|e| plot_err(path, e))?;
            for (i, (name, s)) in series.iter().enumerate() {
                let color = colors[i % colors.len()];
                chart
                    .draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))
                    .map_err(|e| plot_err(path, e))?
                    .label(name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| plot_err(path, e))?;
        }};
    }
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 28))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70);
    if log_y {
        let pos: Vec<f64> = pts.iter().map(|p| p.1).filter(|y| *y > 0.0).collect();
        let (y0, y1) = pos
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(*y), b.max(*y)));
        let (y0, y1) = if pos.is_empty() {
            (1e-3, 1.0)
        } else {
            (y0 * 0.8, y1 * 1.25)
        };
        body!(builder
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .map_err(|e| plot_err(path, e))?);
    } else {
        let (y0, y1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let pad = ((y1 - y0) * 0.05).max(1e-9);
        body!(builder
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(|e| plot_err(path, e))?);
    }
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
}

/// Write `loss.png`, `train_lddt.png`, `eval.png`, `eval_distances.png`, `lr.png`, `grad_norm.png` into `out_dir` (default: the run dir);
/// returns the files written.
pub fn plot_run(run_dir: &Path, out_dir: Option<&Path>) -> Result<Vec<PathBuf>> {
    let path = run_dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let curves = read_curves(&text, &path)?;
    load_font()?;
    let out = out_dir.unwrap_or(run_dir);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut written = Vec::new();
    let pick = |s: &Series, keys: &[&str]| -> Series {
        s.iter()
            .filter(|(k, _)| keys.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    // Loss terms (not the counters), smoothed: single-sample steps are noisy.
    let smooth = |keep: &dyn Fn(&str) -> bool| -> Series {
        curves
            .loss
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), moving_average(v, 20)))
            .collect()
    };
    let losses = smooth(&|k| {
        k == "loss" || (k.starts_with("loss/") && k != "loss/loss" && !k.contains("non_finite"))
    });
    let train_lddt = smooth(&|k| k == "train_lddt_ca");
    // Means over the validation chains only (per-chain series are `<chain>/<metric>`).
    let scores = pick(&curves.eval, &["lddt_ca", "gdt_ts", "gdt_ha"]);
    let distances = pick(&curves.eval, &["rmsd_ca", "drmsd_ca"]);
    let jobs: Vec<(&str, &str, Series, bool)> = vec![
        (
            "loss.png",
            "training loss and terms (moving average, 20 steps)",
            losses,
            true,
        ),
        (
            "train_lddt.png",
            "training-crop lDDT-Ca (moving average, 20 steps)",
            train_lddt,
            false,
        ),
        (
            "eval.png",
            "validation lDDT-Ca, GDT (mean, EMA weights)",
            scores,
            false,
        ),
        (
            "eval_distances.png",
            "validation RMSD / dRMSD in A (mean, EMA weights)",
            distances,
            false,
        ),
        (
            "lr.png",
            "learning rate",
            pick(&curves.optim, &["lr"]),
            false,
        ),
        (
            "grad_norm.png",
            "gradient norm (before clipping)",
            pick(&curves.optim, &["grad_norm"]),
            true,
        ),
    ];
    for (file, title, series, log_y) in jobs {
        if series.values().all(|v| v.is_empty()) {
            continue;
        }
        let p = out.join(file);
        draw(&p, title, &series, log_y)?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"{"kind":"train","step":1,"loss":3.0,"terms":{"fape":1.5,"distogram":null},"grad_norm":2.0,"lr":0.0001}
{"kind":"train","step":2,"loss":2.0,"terms":{"fape":1.0,"distogram":4.0},"grad_norm":1.0,"lr":0.0002}
{"kind":"eval","step":2,"metrics":{"lddt_ca":0.31},"eval_time_s":1.0}
"#;

    #[test]
    fn curves_are_read_and_nulls_skipped() {
        let c = read_curves(LOG, Path::new("m.jsonl")).unwrap();
        assert_eq!(c.loss["loss"], vec![(1.0, 3.0), (2.0, 2.0)]);
        assert_eq!(c.loss["distogram"], vec![(2.0, 4.0)]);
        assert_eq!(c.eval["lddt_ca"], vec![(2.0, 0.31)]);
        assert_eq!(c.optim["lr"].len(), 2);
        let err = read_curves("{\"kind\":\"train\"}\n", Path::new("m.jsonl")).unwrap_err();
        assert!(err.to_string().contains("m.jsonl:1"), "{err}");
    }

    #[test]
    fn pngs_are_written() {
        let dir = std::env::temp_dir().join(format!("ff-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(METRICS_FILE), LOG).unwrap();
        // Needs a TrueType font: scripts/setup.sh installs fonts-dejavu-core.
        let files = plot_run(&dir, None).unwrap();
        assert_eq!(files.len(), 4);
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{}", f.display());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
