//! A hand-written SVG line chart (no plotting dependency): panels side by side,
//! each with axes, ticks, a title and a legend.

use std::fmt::Write;

/// One line.
pub struct Series {
    /// Legend label (`None`: not in the legend).
    pub label: Option<String>,
    /// CSS colour.
    pub color: &'static str,
    /// Points `(x, y)`.
    pub points: Vec<(f64, f64)>,
    /// Stroke width.
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
    /// Fixed y range (else from the data).
    pub y_range: Option<(f64, f64)>,
    /// Legend in the bottom-right corner instead of the top-right.
    pub legend_bottom: bool,
    /// The lines.
    pub series: Vec<Series>,
}

/// Colours for up to eight series.
pub const COLORS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

const W: f64 = 520.0;
const H: f64 = 380.0;
const ML: f64 = 62.0;
const MR: f64 = 16.0;
const MT: f64 = 34.0;
const MB: f64 = 48.0;

fn nice_step(span: f64, target: usize) -> f64 {
    let raw = span / target as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let r = raw / mag;
    let m = if r < 1.5 {
        1.0
    } else if r < 3.5 {
        2.0
    } else if r < 7.5 {
        5.0
    } else {
        10.0
    };
    m * mag
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

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn draw_panel(out: &mut String, p: &Panel, ox: f64, id: usize) {
    let pts = p
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!p.log_y || *y > 0.0));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.1, 1.0);
    }
    if let Some((a, b)) = p.y_range {
        (y0, y1) = (a, b);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let ty = |y: f64| if p.log_y { y.max(1e-300).log10() } else { y };
    let (mut ly0, mut ly1) = (ty(y0), ty(y1));
    if ly1 <= ly0 {
        ly1 = ly0 + 1.0;
    }
    let pad = 0.04 * (ly1 - ly0);
    ly0 -= pad;
    ly1 += pad;
    let (pw, ph) = (W - ML - MR, H - MT - MB);
    let sx = |x: f64| ox + ML + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| MT + (1.0 - (ty(y) - ly0) / (ly1 - ly0)) * ph;
    let _ = writeln!(
        out,
        r#"<clipPath id="c{id}"><rect x="{:.1}" y="{MT}" width="{pw}" height="{ph}"/></clipPath>"#,
        ox + ML
    );
    let _ = writeln!(
        out,
        r##"<rect x="{:.1}" y="{MT}" width="{pw}" height="{ph}" fill="white" stroke="#444"/>"##,
        ox + ML
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        ox + ML + pw / 2.0,
        esc(&p.title)
    );
    // x ticks
    let step = nice_step(x1 - x0, 6);
    let mut t = (x0 / step).ceil() * step;
    while t <= x1 + 1e-9 {
        let x = sx(t);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{MT}" x2="{x:.1}" y2="{:.1}" stroke="#e4e4e4"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"##,
            MT + ph,
            MT + ph + 15.0,
            fmt_tick(t)
        );
        t += step;
    }
    // y ticks
    let ticks: Vec<f64> = if p.log_y {
        let (a, b) = (ly0.floor() as i32, ly1.ceil() as i32);
        let mut v = Vec::new();
        for e in a..=b {
            for m in [1.0, 2.0, 5.0] {
                let y = m * 10f64.powi(e);
                if ty(y) >= ly0 && ty(y) <= ly1 {
                    v.push(y);
                }
            }
        }
        v
    } else {
        let step = nice_step(ly1 - ly0, 6);
        let mut v = Vec::new();
        let mut t = (ly0 / step).ceil() * step;
        while t <= ly1 + 1e-12 {
            v.push(t);
            t += step;
        }
        v
    };
    for y in ticks {
        let py = sy(y);
        let _ = writeln!(
            out,
            r##"<line x1="{:.1}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"##,
            ox + ML,
            ox + ML + pw,
            ox + ML - 5.0,
            py + 4.0,
            fmt_tick(y)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text>"#,
        ox + ML + pw / 2.0,
        H - 10.0,
        esc(&p.xlabel)
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle" font-size="12">{}</text>"#,
        ox + 16.0,
        MT + ph / 2.0,
        esc(&p.ylabel)
    );
    for s in &p.series {
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!p.log_y || *y > 0.0))
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        if path.len() < 2 {
            continue;
        }
        let _ = writeln!(
            out,
            r#"<polyline clip-path="url(#c{id})" fill="none" stroke="{}" stroke-width="{}" stroke-opacity="{}" points="{}"/>"#,
            s.color,
            s.width,
            s.opacity,
            path.join(" ")
        );
    }
    // legend (top right), on a translucent white box
    let n_labels = p.series.iter().filter(|s| s.label.is_some()).count();
    let box_h = 17.0 * n_labels as f64 + 6.0;
    // wide enough for the longest label (about 6.7 px per character at 12 px)
    let longest = p
        .series
        .iter()
        .filter_map(|s| s.label.as_ref())
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(0);
    let box_w = (36.0 + 6.7 * longest as f64).max(146.0);
    let top = if p.legend_bottom {
        MT + ph - box_h - 5.0
    } else {
        MT + 5.0
    };
    if n_labels > 0 {
        let _ = writeln!(
            out,
            r##"<rect x="{:.1}" y="{top:.1}" width="{box_w:.1}" height="{box_h:.1}" fill="white" fill-opacity="0.85" stroke="#ccc"/>"##,
            ox + ML + pw - box_w - 10.0,
        );
    }
    let mut ly = top + 11.0;
    for s in p.series.iter().filter(|s| s.label.is_some()) {
        let lx = ox + ML + pw - box_w - 4.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="3"/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"#,
            lx + 22.0,
            s.color,
            lx + 28.0,
            ly + 4.0,
            esc(s.label.as_deref().unwrap_or(""))
        );
        ly += 17.0;
    }
}

/// The panels side by side, with a caption line under them.
pub fn svg(panels: &[Panel], caption: &str) -> String {
    let width = W * panels.len() as f64;
    let height = H + 22.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, p) in panels.iter().enumerate() {
        draw_panel(&mut out, p, i as f64 * W, i);
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11" fill="#555">{}</text>"##,
        width / 2.0,
        H + 14.0,
        esc(caption)
    );
    out.push_str("</svg>\n");
    out
}
