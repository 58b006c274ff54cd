//! train_lm's figure, drawn with plotters: line charts side by side, each
//! with axes, a title and a legend, and a caption under them; written as SVG
//! and as PNG.
//!
//! The PNG's text is drawn by plotters' `ab_glyph` backend with the committed
//! DejaVu Sans (`fonts/DejaVuSans.ttf`, licence in `fonts/LICENSE`), so no
//! system font library is needed. The SVG names the `sans-serif` family and
//! leaves the glyphs to the viewer.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle, RGBColor};

/// DejaVu Sans 2.37, unmodified (see `fonts/LICENSE`).
const FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");
/// The family the figure's text asks for.
const FAMILY: &str = "sans-serif";

/// One line.
pub struct Series {
    /// Legend label (`None`: not in the legend).
    pub label: Option<String>,
    /// Colour.
    pub color: RGBColor,
    /// Points `(x, y)`.
    pub points: Vec<(f64, f64)>,
    /// Stroke width in SVG pixels.
    pub width: f64,
    /// Stroke opacity.
    pub opacity: f64,
}

/// One chart.
pub struct Panel {
    /// Title above the chart.
    pub title: String,
    /// X-axis label.
    pub xlabel: String,
    /// Y-axis label.
    pub ylabel: String,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// Fixed y range (else from the data); lines are clipped to it.
    pub y_range: Option<(f64, f64)>,
    /// Legend in the bottom-right corner instead of the top-right.
    pub legend_bottom: bool,
    /// The lines.
    pub series: Vec<Series>,
}

/// Colours for up to eight series (matplotlib's "tab10").
pub const COLORS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// Size of one panel, in SVG pixels.
const W: f64 = 520.0;
const H: f64 = 380.0;
/// Height of the caption line under the panels.
const CAPTION_H: f64 = 22.0;
/// The PNG is drawn at this multiple of the SVG's size.
const PNG_SCALE: f64 = 2.0;

/// Writes the panels side by side, with `caption` under them, as an SVG file
/// and as a PNG file.
pub fn write(svg: &Path, png: &Path, panels: &[Panel], caption: &str) -> Result<()> {
    register_font(FAMILY, FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("the bundled font fonts/DejaVuSans.ttf is not a valid font"))?;

    let size = |s: f64| {
        (
            (s * W * panels.len().max(1) as f64).round() as u32,
            (s * (H + CAPTION_H)).round() as u32,
        )
    };

    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, size(1.0)).into_drawing_area();
        draw(&root, panels, caption, 1.0).context("drawing the SVG figure")?;
        root.present().context("drawing the SVG figure")?;
    }
    crate::support::create(svg)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .with_context(|| format!("writing {}", svg.display()))?;

    let (w, h) = size(PNG_SCALE);
    let mut rgb = vec![0u8; 3 * w as usize * h as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(&root, panels, caption, PNG_SCALE).context("drawing the PNG figure")?;
        root.present().context("drawing the PNG figure")?;
    }
    write_png(png, w, h, &rgb).with_context(|| format!("writing {}", png.display()))
}

fn write_png(path: &Path, w: u32, h: u32, rgb: &[u8]) -> Result<()> {
    let file = std::io::BufWriter::new(crate::support::create(path)?);
    let mut encoder = png::Encoder::new(file, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(())
}

/// The whole figure at `s` times the SVG size.
fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[Panel],
    caption: &str,
    s: f64,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (charts, bottom) = root.split_vertically((s * H).round() as u32);
    for (area, panel) in charts
        .split_evenly((1, panels.len().max(1)))
        .iter()
        .zip(panels)
    {
        draw_panel(area, panel, s)?;
    }
    let (w, h) = bottom.dim_in_pixel();
    let style = (FAMILY, 12.5 * s)
        .into_font()
        .color(&RGBColor(0x55, 0x55, 0x55))
        .pos(Pos::new(HPos::Center, VPos::Center));
    bottom.draw(&Text::new(
        caption.to_string(),
        (w as i32 / 2, h as i32 / 2),
        style,
    ))?;
    Ok(())
}

/// Data range of a panel: `(x0, x1, y0, y1)`, y padded by 4 % (of its
/// logarithm on a log axis).
fn ranges(p: &Panel) -> (f64, f64, f64, f64) {
    let usable = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!p.log_y || y > 0.0);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in p
        .series
        .iter()
        .flat_map(|s| &s.points)
        .filter(|q| usable(q))
    {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.1, 1.0);
    }
    if let Some(r) = p.y_range {
        (y0, y1) = r;
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let fwd = |v: f64| if p.log_y { v.log10() } else { v };
    let back = |v: f64| if p.log_y { 10f64.powf(v) } else { v };
    let (ly0, mut ly1) = (fwd(y0), fwd(y1));
    if ly1 <= ly0 {
        ly1 = ly0 + 1.0;
    }
    let pad = 0.04 * (ly1 - ly0);
    (x0, x1, back(ly0 - pad), back(ly1 + pad))
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel, s: f64) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let px = |v: f64| (s * v).round() as u32;
    let (x0, x1, y0, y1) = ranges(p);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(&p.title, (FAMILY, 16.0 * s, FontStyle::Bold))
        .margin_top(px(8.0))
        .margin_left(px(8.0))
        .margin_right(px(16.0))
        .margin_bottom(px(6.0))
        .x_label_area_size(px(44.0))
        .y_label_area_size(px(60.0));
    if p.log_y {
        let y = (y0..y1).log_scale().with_key_points(log_ticks(y0, y1));
        let mut chart = builder.build_cartesian_2d(x0..x1, y)?;
        fill_chart(&mut chart, p, (x0, x1, y0, y1), s)
    } else {
        let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1)?;
        fill_chart(&mut chart, p, (x0, x1, y0, y1), s)
    }
}

/// Mesh, lines, frame and legend of one chart.
fn fill_chart<'a, DB, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>,
    p: &Panel,
    (x0, x1, y0, y1): (f64, f64, f64, f64),
    s: f64,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let px = move |v: f64| (s * v).round() as u32;
    let grid = RGBColor(0xe4, 0xe4, 0xe4);
    let frame = RGBColor(0x44, 0x44, 0x44);
    chart
        .configure_mesh()
        .x_desc(p.xlabel.as_str())
        .y_desc(p.ylabel.as_str())
        .axis_desc_style((FAMILY, 14.0 * s))
        .label_style((FAMILY, 12.5 * s))
        .x_labels(7)
        .y_labels(10)
        .x_label_formatter(&|v| fmt_tick(*v))
        .y_label_formatter(&|v| fmt_tick(*v))
        .bold_line_style(grid.stroke_width(px(1.0)))
        .light_line_style(TRANSPARENT)
        .axis_style(frame.stroke_width(px(1.0)))
        .set_all_tick_mark_size(px(4.0))
        .draw()?;
    for series in &p.series {
        let style = series
            .color
            .mix(series.opacity)
            .stroke_width(px(series.width).max(1));
        let mut drawn = false;
        for piece in clip_y(&series.points, y0, y1, p.log_y) {
            let anno = chart.draw_series(LineSeries::new(piece, style))?;
            if let (Some(label), false) = (&series.label, drawn) {
                let color = series.color;
                anno.label(label.as_str()).legend(move |(x, y)| {
                    PathElement::new(
                        vec![(x, y), (x + px(22.0) as i32, y)],
                        color.stroke_width(px(3.0)),
                    )
                });
            }
            drawn = true;
        }
    }
    chart.draw_series(std::iter::once(Rectangle::new(
        [(x0, y0), (x1, y1)],
        frame.stroke_width(px(1.0)),
    )))?;
    chart
        .configure_series_labels()
        .position(if p.legend_bottom {
            SeriesLabelPosition::LowerRight
        } else {
            SeriesLabelPosition::UpperRight
        })
        .margin(px(8.0))
        .legend_area_size(px(30.0))
        .label_font((FAMILY, 13.5 * s))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(0xcc, 0xcc, 0xcc))
        .draw()?;
    Ok(())
}

/// The parts of a line inside `y0 ≤ y ≤ y1` (non-finite points, and points
/// ≤ 0 on a log axis, dropped): each segment is cut where it crosses a bound
/// (linearly in the axis' coordinate), and consecutive kept segments joined.
fn clip_y(points: &[(f64, f64)], y0: f64, y1: f64, log: bool) -> Vec<Vec<(f64, f64)>> {
    let t = |y: f64| if log { y.log10() } else { y };
    let (lo, hi) = (t(y0), t(y1));
    let pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log || *y > 0.0))
        .map(|&(x, y)| (x, t(y)))
        .collect();
    let mut pieces: Vec<Vec<(f64, f64)>> = Vec::new();
    // whether the last kept segment ended at its end point (so the next one,
    // if it starts at its start point, continues the same piece)
    let mut open = false;
    for w in pts.windows(2) {
        let (a, b) = (w[0], w[1]);
        let (f_in, f_out) = if a.1 == b.1 {
            if (lo..=hi).contains(&a.1) {
                (0.0, 1.0)
            } else {
                (1.0, 0.0)
            }
        } else {
            let fl = (lo - a.1) / (b.1 - a.1);
            let fh = (hi - a.1) / (b.1 - a.1);
            (fl.min(fh).max(0.0), fl.max(fh).min(1.0))
        };
        if f_in > f_out {
            open = false;
            continue;
        }
        let at = |f: f64| (a.0 + f * (b.0 - a.0), a.1 + f * (b.1 - a.1));
        match pieces.last_mut() {
            Some(piece) if open && f_in == 0.0 => piece.push(at(f_out)),
            _ => pieces.push(vec![at(f_in), at(f_out)]),
        }
        open = f_out == 1.0;
    }
    let inv = |v: f64| if log { 10f64.powf(v) } else { v };
    pieces
        .into_iter()
        .map(|p| p.into_iter().map(|(x, v)| (x, inv(v))).collect())
        .collect()
}

/// Ticks at 1, 2 and 5 times the powers of ten in `[y0, y1]`.
fn log_ticks(y0: f64, y1: f64) -> Vec<f64> {
    let (a, b) = (y0.log10().floor() as i32, y1.log10().ceil() as i32);
    (a..=b)
        .flat_map(|e| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(e)))
        .filter(|y| (y0..=y1).contains(y))
        .collect()
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 || v.abs() < 0.01 {
        format!("{v:.0e}")
    } else if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if (v * 10.0 - (v * 10.0).round()).abs() < 1e-9 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
