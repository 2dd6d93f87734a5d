//! Hand-written SVG charts of the inspector (`qlora inspect` writes them, the web page shows
//! them): overlaid histograms with vertical marker lines, and heat-map panels side by side. Every chart is built from the same parts (frame, ticks,
//! legend), so each kind of plot is one function.

use std::fmt::Write;

use super::{HeatMap, Histogram, Sqnr};

/// Colours of the series, in order (colour-blind safe: Okabe–Ito).
pub const PALETTE: [&str; 4] = ["#0072B2", "#D55E00", "#009E73", "#CC79A7"];

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 440.0;
/// Plot area margins: left (y tick labels), right, top (title), bottom (x ticks and label).
const MARGIN: (f64, f64, f64, f64) = (78.0, 24.0, 44.0, 58.0);

/// One histogram drawn as a step line.
pub struct Series<'a> {
    pub label: String,
    pub color: &'static str,
    pub histogram: &'a Histogram,
}

/// Vertical dashed lines at `xs` (e.g. the 4-bit code levels).
pub struct Markers {
    pub label: String,
    pub color: &'static str,
    pub xs: Vec<f64>,
}

pub struct HistogramChart<'a> {
    pub title: String,
    pub x_label: String,
    pub series: Vec<Series<'a>>,
    pub markers: Vec<Markers>,
}

/// The chart as an SVG document: counts on the y axis, the histograms' shared range on x.
pub fn histogram_svg(chart: &HistogramChart) -> String {
    let lo = chart
        .series
        .iter()
        .map(|s| s.histogram.lo)
        .fold(f64::INFINITY, f64::min);
    let hi = chart
        .series
        .iter()
        .map(|s| s.histogram.hi)
        .fold(f64::NEG_INFINITY, f64::max);
    let top = chart
        .series
        .iter()
        .flat_map(|s| s.histogram.counts.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let frame = Frame::new((lo, hi), (0.0, top * 1.05));
    let mut svg = Svg::new(WIDTH, HEIGHT);
    frame.draw_axes(&mut svg, &chart.title, &chart.x_label, "count");
    // Under the markers, so that their own tooltips win where they cross a column.
    hover_columns(&mut svg, &frame, chart);
    for m in &chart.markers {
        for (i, &x) in
            m.xs.iter()
                .enumerate()
                .filter(|(_, x)| (lo..=hi).contains(*x))
        {
            let px = frame.px(x);
            let (y0, y1) = (frame.py(0.0), frame.py(top * 1.05));
            svg.titled(&format!("code {i}: {x:.4e} ({})", m.label), |svg| {
                svg.line(
                    px,
                    y0,
                    px,
                    y1,
                    m.color,
                    "stroke-dasharray=\"4 3\" stroke-width=\"1\"",
                );
                // A wider invisible line, so the tooltip is easy to hit.
                svg.line(
                    px,
                    y0,
                    px,
                    y1,
                    m.color,
                    "stroke-opacity=\"0\" stroke-width=\"6\"",
                );
            });
        }
    }
    for s in &chart.series {
        let h = s.histogram;
        let mut points = format!("{:.2},{:.2}", frame.px(h.lo), frame.py(0.0));
        for (&c, edges) in h.counts.iter().zip(h.edges().windows(2)) {
            let (x0, x1) = (edges[0], edges[1]);
            let y = frame.py(c as f64);
            write!(
                points,
                " {:.2},{y:.2} {:.2},{y:.2}",
                frame.px(x0),
                frame.px(x1)
            )
            .unwrap();
        }
        write!(points, " {:.2},{:.2}", frame.px(h.hi), frame.py(0.0)).unwrap();
        writeln!(
            svg.body,
            r#"<polyline points="{points}" fill="{}" fill-opacity="0.12" stroke="{}" stroke-width="1.5" pointer-events="none"/>"#,
            s.color, s.color
        )
        .unwrap();
    }
    let entries: Vec<(&str, &str)> = chart
        .series
        .iter()
        .map(|s| (s.label.as_str(), s.color))
        .chain(chart.markers.iter().map(|m| (m.label.as_str(), m.color)))
        .collect();
    svg.legend(WIDTH - MARGIN.1 - 8.0, MARGIN.2 + 8.0, &entries);
    svg.finish()
}

/// An invisible full-height column over each bin of the first series, whose tooltip gives the
/// bin's range and every series' count there (looked up at the bin's centre, so series with
/// other bins still read right).
fn hover_columns(svg: &mut Svg, frame: &Frame, chart: &HistogramChart) {
    let Some(first) = chart.series.first() else {
        return;
    };
    let (top, bottom) = (frame.py(frame.y.1), frame.py(0.0));
    for edges in first.histogram.edges().windows(2) {
        let (x0, x1) = (edges[0], edges[1]);
        let centre = (x0 + x1) / 2.0;
        let mut tip = format!("[{}, {})", tick_label(x0), tick_label(x1));
        for s in &chart.series {
            let h = s.histogram;
            let bin = (centre - h.lo) / h.bin_width();
            let count = if bin >= 0.0 {
                h.counts.get(bin as usize).copied().unwrap_or(0)
            } else {
                0
            };
            write!(tip, "\n{}: {count}", s.label).unwrap();
        }
        let (px0, px1) = (frame.px(x0), frame.px(x1));
        svg.titled(&tip, |svg| {
            writeln!(
                svg.body,
                r##"<rect x="{px0:.2}" y="{top:.2}" width="{:.2}" height="{:.2}" fill="#000" fill-opacity="0"/>"##,
                px1 - px0,
                bottom - top
            )
            .unwrap();
        });
    }
}

/// Heat-map panels side by side (e.g. NF4 and FP4 of one block size) on one colour scale:
/// SQNR in dB by layer (rows) and module (columns), each cell labelled with its value.
pub fn heat_maps_svg(title: &str, panels: &[(&str, &HeatMap)]) -> String {
    const CELL: (f64, f64) = (64.0, 22.0);
    const LEFT: f64 = 70.0;
    const TOP: f64 = 110.0;
    // Room for the next panel's row labels.
    const GAP: f64 = 80.0;
    let finite: Vec<f64> = panels
        .iter()
        .flat_map(|(_, m)| m.sqnr.iter().flatten().flatten().map(|s| s.db()))
        .filter(|d| d.is_finite())
        .collect();
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo < hi {
        (lo, hi)
    } else {
        (lo - 1.0, lo + 1.0)
    };
    let panel_w = |m: &HeatMap| m.modules.len() as f64 * CELL.0;
    let rows = panels
        .iter()
        .map(|(_, m)| m.layers.len())
        .max()
        .unwrap_or(0) as f64;
    let width = LEFT + panels.iter().map(|(_, m)| panel_w(m) + GAP).sum::<f64>() + 90.0;
    let height = TOP + rows * CELL.1 + 50.0;
    let mut svg = Svg::new(width, height);
    svg.text(
        width / 2.0,
        24.0,
        title,
        "middle",
        16.0,
        "font-weight=\"bold\"",
    );

    let mut x0 = LEFT;
    for (name, map) in panels {
        svg.text(
            x0 + panel_w(map) / 2.0,
            48.0,
            name,
            "middle",
            14.0,
            "font-weight=\"bold\"",
        );
        for (c, module) in map.modules.iter().enumerate() {
            let x = x0 + (c as f64 + 0.5) * CELL.0;
            let rotate = format!("transform=\"rotate(-35 {x:.1} {:.1})\"", TOP - 6.0);
            svg.text(x, TOP - 6.0, module, "start", 11.0, &rotate);
        }
        for (r, (layer, row)) in map.layers.iter().zip(&map.sqnr).enumerate() {
            let y = TOP + r as f64 * CELL.1;
            svg.text(
                x0 - 6.0,
                y + CELL.1 * 0.7,
                &format!("layer {layer}"),
                "end",
                11.0,
                "",
            );
            for (c, cell) in row.iter().enumerate() {
                let x = x0 + c as f64 * CELL.0;
                // Position on the colour scale, for the fill and a readable text colour.
                let (t, label) = match cell {
                    None => (None, "–".to_string()),
                    Some(Sqnr::Db(db)) => (Some((db - lo) / (hi - lo)), format!("{db:.2}")),
                    Some(Sqnr::Lossless) => (Some(1.0), "∞".to_string()),
                    Some(Sqnr::NoSignal) => (None, "n/a".to_string()),
                };
                let fill = t.map_or_else(|| "#dddddd".to_string(), scale_color);
                let ink = if t.is_some_and(|t| t < 0.5) {
                    "fill=\"#fff\""
                } else {
                    "fill=\"#000\""
                };
                let tip = format!("{name}, layer {layer}, {}: SQNR {label} dB", map.modules[c]);
                svg.titled(&tip, |svg| {
                    svg.rect(x, y, CELL.0, CELL.1, &fill);
                    svg.text(
                        x + CELL.0 / 2.0,
                        y + CELL.1 * 0.7,
                        &label,
                        "middle",
                        10.0,
                        ink,
                    );
                });
            }
        }
        x0 += panel_w(map) + GAP;
    }
    // Colour bar: the scale's bottom at the bottom, labelled at both ends and the middle.
    let (bar_x, bar_h) = (x0, rows.max(4.0) * CELL.1);
    let steps = 40;
    for i in 0..steps {
        let t = (i as f64 + 0.5) / steps as f64;
        let y = TOP + bar_h * (1.0 - (i + 1) as f64 / steps as f64);
        svg.rect(bar_x, y, 16.0, bar_h / steps as f64 + 0.5, &scale_color(t));
    }
    for t in [0.0, 0.5, 1.0] {
        let y = TOP + bar_h * (1.0 - t);
        let label = format!("{:.1} dB", lo + t * (hi - lo));
        svg.text(bar_x + 20.0, y + 4.0, &label, "start", 10.0, "");
    }
    svg.text(bar_x, TOP - 10.0, "SQNR", "start", 11.0, "");
    svg.finish()
}

/// A colour of the viridis scale at `t` in [0, 1] (dark blue for low, yellow for high).
fn scale_color(t: f64) -> String {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + f * (y - x)).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        mix(a.0, b.0),
        mix(a.1, b.1),
        mix(a.2, b.2)
    )
}

/// Data → pixel mapping of a chart's plot area.
struct Frame {
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    fn new(x: (f64, f64), y: (f64, f64)) -> Frame {
        Frame { x, y }
    }

    fn px(&self, x: f64) -> f64 {
        MARGIN.0 + (x - self.x.0) / (self.x.1 - self.x.0) * (WIDTH - MARGIN.0 - MARGIN.1)
    }

    fn py(&self, y: f64) -> f64 {
        HEIGHT - MARGIN.3 - (y - self.y.0) / (self.y.1 - self.y.0) * (HEIGHT - MARGIN.2 - MARGIN.3)
    }

    /// Title, frame, ticks with labels, and axis labels.
    fn draw_axes(&self, svg: &mut Svg, title: &str, x_label: &str, y_label: &str) {
        let (left, right) = (MARGIN.0, WIDTH - MARGIN.1);
        let (top, bottom) = (MARGIN.2, HEIGHT - MARGIN.3);
        // Shrunk to fit long tensor names (bold sans-serif is about 0.56 em a character).
        let size = 15f64.min((WIDTH - 16.0) / (0.56 * title.chars().count() as f64));
        let bold = "font-weight=\"bold\"";
        svg.text(WIDTH / 2.0, 26.0, title, "middle", size.floor(), bold);
        writeln!(
            svg.body,
            r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
            right - left,
            bottom - top
        )
        .unwrap();
        for x in nice_ticks(self.x.0, self.x.1, 8) {
            let px = self.px(x);
            svg.line(px, bottom, px, bottom + 5.0, "#333", "");
            svg.text(px, bottom + 18.0, &tick_label(x), "middle", 11.0, "");
        }
        for y in nice_ticks(self.y.0, self.y.1, 6) {
            let py = self.py(y);
            svg.line(left - 5.0, py, left, py, "#333", "");
            svg.line(left, py, right, py, "#ddd", "");
            svg.text(left - 8.0, py + 4.0, &tick_label(y), "end", 11.0, "");
        }
        svg.text(
            (left + right) / 2.0,
            HEIGHT - 16.0,
            x_label,
            "middle",
            12.0,
            "",
        );
        let (ly, lx) = ((top + bottom) / 2.0, 18.0);
        let rotate = format!("transform=\"rotate(-90 {lx} {ly})\"");
        svg.text(lx, ly, y_label, "middle", 12.0, &rotate);
    }
}

/// About `target` round tick values (1, 2 or 5 × 10^k apart) inside `[lo, hi]`.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let raw = (hi - lo) / target as f64;
    if raw <= 0.0 || !raw.is_finite() {
        return vec![lo];
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// Short tick text: plain for moderate magnitudes, scientific for tiny or huge ones.
fn tick_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if (1e-3..1e5).contains(&v.abs()) {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.1e}")
    }
}

/// An SVG document being written.
struct Svg {
    width: f64,
    height: f64,
    body: String,
}

impl Svg {
    fn new(width: f64, height: f64) -> Svg {
        Svg {
            width,
            height,
            body: String::new(),
        }
    }

    fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, color: &str, extra: &str) {
        writeln!(
            self.body,
            r#"<line x1="{x1:.2}" y1="{y1:.2}" x2="{x2:.2}" y2="{y2:.2}" stroke="{color}" {extra}/>"#
        )
        .unwrap();
    }

    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str) {
        writeln!(
            self.body,
            r#"<rect x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{h:.2}" fill="{fill}"/>"#
        )
        .unwrap();
    }

    fn text(&mut self, x: f64, y: f64, text: &str, anchor: &str, size: f64, extra: &str) {
        writeln!(
            self.body,
            r#"<text x="{x:.2}" y="{y:.2}" text-anchor="{anchor}" font-size="{size}" {extra}>{}</text>"#,
            escape(text)
        )
        .unwrap();
    }

    /// What `draw` writes, grouped under a `<title>`: browsers show it as the tooltip.
    fn titled(&mut self, title: &str, draw: impl FnOnce(&mut Svg)) {
        writeln!(self.body, "<g><title>{}</title>", escape(title)).unwrap();
        draw(self);
        self.body.push_str("</g>\n");
    }

    /// A boxed legend with one coloured swatch per entry, top-right corner at `(right, y)`,
    /// as wide as its longest label (about 6.5 px a character at 11 px).
    fn legend(&mut self, right: f64, y: f64, entries: &[(&str, &str)]) {
        let longest = entries
            .iter()
            .map(|(l, _)| l.chars().count())
            .max()
            .unwrap_or(0);
        let w = 46.0 + longest as f64 * 6.5;
        let h = 8.0 + entries.len() as f64 * 18.0;
        let x = right - w;
        writeln!(
            self.body,
            r##"<rect x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{h:.2}" fill="#fff" fill-opacity="0.85" stroke="#999"/>"##
        )
        .unwrap();
        for (i, (label, color)) in entries.iter().enumerate() {
            let ly = y + 16.0 + i as f64 * 18.0;
            self.line(
                x + 8.0,
                ly - 4.0,
                x + 30.0,
                ly - 4.0,
                color,
                "stroke-width=\"3\"",
            );
            self.text(x + 36.0, ly, label, "start", 11.0, "");
        }
    }

    fn finish(self) -> String {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" \
             viewBox=\"0 0 {w:.0} {h:.0}\" font-family=\"sans-serif\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n{}</svg>\n",
            self.body,
            w = self.width,
            h = self.height
        )
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        assert_eq!(
            nice_ticks(0.0, 10.0, 5),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        let t = nice_ticks(-0.0379, 0.0379, 8);
        assert!(
            t.iter().all(|v| (-0.0379..=0.0379).contains(v)) && t.contains(&0.0),
            "{t:?}"
        );
        assert_eq!(tick_label(0.01), "0.01");
        assert_eq!(tick_label(2.5e-5), "2.5e-5");
    }

    #[test]
    fn colour_scale_ends() {
        assert_eq!(scale_color(0.0), "#440154");
        assert_eq!(scale_color(1.0), "#fde725");
    }
}
