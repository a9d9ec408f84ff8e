//! The run's chart (issue 24): TPS and proxy CPU per transaction by target
//! and client count, as grouped bars in one SVG, so the comparison the
//! tables make can be seen at a glance. Drawn with `plotters`' SVG backend,
//! which needs no font files (text sizes are estimated).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use crate::relay::CLIENTS;
use crate::{Results, Target};

const COLOURS: [RGBColor; 5] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
];

/// Writes the chart of `targets` to `path` (its directory is created).
pub fn write(r: &Results, targets: &[Target], path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(600);
    let with_direct: Vec<Target> = std::iter::once(Target::Direct)
        .chain(targets.iter().copied())
        .collect();
    panel(
        &left,
        r,
        &with_direct,
        "tps",
        "transactions per second (pgbench -S)",
    )?;
    panel(
        &right,
        r,
        targets,
        "cpu_us_per_txn",
        "proxy CPU per transaction, µs (user + system)",
    )?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// One panel: a group of bars per client count, one bar per target.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    r: &Results,
    targets: &[Target],
    metric: &'static str,
    title: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let value = |c: usize, t: Target| r.median(&format!("select {c}"), t, metric);
    let top = CLIENTS
        .iter()
        .flat_map(|&c| targets.iter().filter_map(move |&t| value(c, t)))
        .fold(0.0_f64, f64::max)
        .max(1.0)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..CLIENTS.len() as f64, 0.0..top)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(CLIENTS.len() * 2 + 1)
        .x_label_formatter(&|x| group_label(*x))
        .x_desc("clients")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let width = 0.8 / targets.len() as f64;
    for (j, &t) in targets.iter().enumerate() {
        let colour = COLOURS[j % COLOURS.len()];
        let bars = CLIENTS.iter().enumerate().filter_map(|(i, &c)| {
            let v = value(c, t)?;
            let x0 = i as f64 + 0.1 + j as f64 * width;
            Some(Rectangle::new(
                [(x0, 0.0), (x0 + width, v)],
                colour.filled(),
            ))
        });
        chart
            .draw_series(bars)
            .map_err(|e| anyhow!("{e}"))?
            .label(t.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The client count under the middle of its group; nothing elsewhere.
fn group_label(x: f64) -> String {
    let i = x - 0.5;
    if i >= 0.0 && (i - i.round()).abs() < 1e-6 {
        if let Some(c) = CLIENTS.get(i.round() as usize) {
            return c.to_string();
        }
    }
    String::new()
}
