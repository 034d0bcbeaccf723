//! `loss.png`: training loss per optimiser step (blue) and validation loss per epoch (red, dots),
//! drawn from `metrics.jsonl` with plotters' bitmap backend. No text is drawn, so no font is needed
//! (plotters' fonts come from the system or an embedded file); the numbers are in `metrics.jsonl`.

use plotters::prelude::*;
use std::path::Path;

/// (step, loss) points.
type Series = Vec<(f64, f64)>;

/// Training and validation loss series of a `metrics.jsonl`.
fn series(metrics: &str) -> (Series, Series) {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for v in metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
            train.push((step, l));
        } else if let Some(l) = v.get("val_loss").and_then(|l| l.as_f64()) {
            val.push((step, l));
        }
    }
    (train, val)
}

const SIZE: (u32, u32) = (800, 480);

/// Renders `metrics` into the PNG `out` (800 × 480), written atomically.
pub fn render(metrics: &str, out: &Path) -> Result<(), String> {
    let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    draw(metrics, &mut pixels)?;
    let img = image::RgbImage::from_raw(SIZE.0, SIZE.1, pixels).ok_or("plot buffer size")?;
    crate::fsutil::write_atomic(out, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
            .map_err(std::io::Error::other)
    })
    .map_err(|e| e.to_string())
}

/// Draws the chart into an RGB buffer (PNG encoding uses the crate's own `image`, not plotters').
fn draw(metrics: &str, pixels: &mut [u8]) -> Result<(), String> {
    let (train, val) = series(metrics);
    let all = train.iter().chain(&val);
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let y_max = all
        .map(|p| p.1)
        .filter(|y| y.is_finite())
        .fold(1e-6, f64::max)
        * 1.05;
    let root = BitMapBackend::with_buffer(pixels, SIZE).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(0)
        .draw()
        .map_err(|x| e(&x))?;
    chart
        .draw_series(LineSeries::new(train, BLUE.stroke_width(2)))
        .map_err(|x| e(&x))?;
    chart
        .draw_series(LineSeries::new(val.clone(), RED.stroke_width(2)))
        .map_err(|x| e(&x))?;
    chart
        .draw_series(val.into_iter().map(|p| Circle::new(p, 4, RED.filled())))
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}
