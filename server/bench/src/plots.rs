//! PNG charts. Text uses a font embedded in the binary (DejaVu Sans, ASCII subset) through
//! plotters' `ab_glyph` backend, so plots render on machines without fontconfig or fonts.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::stats::Histogram;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-ascii.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (1000, 640);
const COLORS: [RGBColor; 6] = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("embedded plot font is not a valid TrueType font")]
    Font,
    #[error("drawing {path}: {reason}")]
    Draw { path: String, reason: String },
}

fn ensure_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(PlotError::Font)
    }
}

/// One named line of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart with point markers and a legend; `x_label` formats tick values (e.g. to show
/// a log2-scaled axis as token counts). Series without points are skipped.
pub fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    x_label: &dyn Fn(&f64) -> String,
) -> Result<(), PlotError> {
    ensure_font()?;
    let err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (mut x0, mut x1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    if all.is_empty() {
        (x0, x1) = (0.0, 1.0);
    }
    let pad = ((x1 - x0) * 0.05).max(0.5);
    let y1 = all.iter().map(|p| p.1).fold(0.0_f64, f64::max) * 1.1;
    let y1 = if y1 > 0.0 { y1 } else { 1.0 };

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 26))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(80)
        .build_cartesian_2d((x0 - pad)..(x1 + pad), 0.0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(x_label)
        .y_label_formatter(&number_label)
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 18))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().filter(|s| !s.points.is_empty()).enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FAMILY, 16))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// A bar histogram; `scale` converts edge units for the axis (e.g. seconds to milliseconds).
pub fn histogram(
    path: &Path,
    title: &str,
    x_desc: &str,
    hist: &Histogram,
    scale: f64,
) -> Result<(), PlotError> {
    ensure_font()?;
    let err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let x0 = hist.edges.first().copied().unwrap_or(0.0) * scale;
    let x1 = hist.edges.last().copied().unwrap_or(1.0) * scale;
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let y1 = hist.counts.iter().copied().max().unwrap_or(0).max(1) as f64 * 1.1;

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 26))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("count")
        .x_label_formatter(&number_label)
        .y_label_formatter(&|y| {
            if (y - y.round()).abs() < 1e-9 {
                format!("{y:.0}")
            } else {
                String::new()
            }
        })
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 18))
        .draw()
        .map_err(|e| err(&e))?;
    let bars = hist.counts.iter().enumerate().map(|(i, &c)| {
        let (a, b) = (hist.edges[i] * scale, hist.edges[i + 1] * scale);
        Rectangle::new([(a, 0.0), (b, c as f64)], BLUE.mix(0.7).filled())
    });
    chart.draw_series(bars).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Tick label for plain numbers: `2`, `1.5`, `0.25` (no `2.0`, no rounding 1.5 to `2`).
pub fn number_label(x: &f64) -> String {
    if x.abs() < 1e-9 {
        return "0".into();
    }
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Tick label for a log2-scaled token-count axis: 13 -> "8K", 20 -> "1M". Ticks between
/// powers of two stay unlabelled so every label is a round context length.
pub fn log2_tokens_label(x: &f64) -> String {
    if (x - x.round()).abs() > 1e-6 {
        return String::new();
    }
    let n = 2f64.powf(x.round());
    if n >= 1_048_576.0 {
        format!("{}M", trim(n / 1_048_576.0))
    } else if n >= 1024.0 {
        format!("{}K", trim(n / 1024.0))
    } else {
        format!("{n}")
    }
}

fn trim(v: f64) -> String {
    if (v - v.round()).abs() < 0.05 {
        format!("{}", v.round())
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_labels() {
        assert_eq!(log2_tokens_label(&13.0), "8K");
        assert_eq!(log2_tokens_label(&20.0), "1M");
        assert_eq!(log2_tokens_label(&6.0), "64");
        assert_eq!(log2_tokens_label(&13.5), "");
        assert_eq!(number_label(&1.5), "1.5");
        assert_eq!(number_label(&2.0), "2");
        assert_eq!(number_label(&-0.0000000001), "0");
        assert_eq!(number_label(&0.25), "0.25");
    }

    #[test]
    fn embedded_font_registers_and_charts_render() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.png");
        let s = vec![Series {
            name: "aggregate".into(),
            points: vec![(1.0, 40.0), (2.0, 75.0)],
        }];
        lines(&p, "t", "x", "y", &s, &|x| format!("{x}")).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let h = Histogram::new(&[0.01, 0.02, 0.02], 4, 0.0, 0.04);
        histogram(&dir.path().join("h.png"), "t", "ms", &h, 1000.0).unwrap();
        // No data still yields a (blank) chart rather than an error.
        lines(&dir.path().join("e.png"), "t", "x", "y", &[], &|x| {
            format!("{x}")
        })
        .unwrap();
    }
}
