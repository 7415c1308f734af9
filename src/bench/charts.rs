//! The sweep's charts, as SVG and PNG: per guest, total time against link
//! speed for each codec, and wire bytes and CPU time per codec. Text is drawn
//! from a bundled font, so the PNGs render on machines with no fonts.

use super::sweep::{link_label, Cell};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
pub(crate) const SIZE: (u32, u32) = (900, 560);
pub(crate) const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

pub(crate) fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bundled font is valid TrueType: registration cannot fail on it.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

pub(crate) type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The label of category `x` on an axis whose categories sit at 0, 1, 2, ...
/// (empty between them, where plotters may also put a tick).
pub(crate) fn index_label(x: f64, labels: &[String]) -> String {
    let i = x.round();
    if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
        labels[i as usize].clone()
    } else {
        String::new()
    }
}

fn ordered<T: PartialEq + Clone>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

fn total_time<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    guest: &str,
    cells: &[&Cell],
) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let mut links = ordered(cells.iter().map(|c| c.link_bps));
    links.sort_by_key(|l| l.unwrap_or(u64::MAX));
    let link_names: Vec<String> = links.iter().map(|l| link_label(*l)).collect();
    let codecs = ordered(cells.iter().map(|c| c.row()));
    let times: Vec<f64> = cells
        .iter()
        .filter_map(|c| c.total_ms.map(|s| s.median))
        .collect();
    let lo = times.iter().cloned().fold(f64::INFINITY, f64::min).max(0.1) / 1.5;
    let hi = times.iter().cloned().fold(0.0, f64::max).max(lo * 2.0) * 1.5;
    let n = links.len() as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("total time by link speed: {guest}"),
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(links.len())
        .x_label_formatter(&|x| index_label(*x, &link_names))
        .y_desc("total time, ms (log)")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for (k, codec) in codecs.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let points: Vec<(f64, f64)> = links
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                cells
                    .iter()
                    .find(|c| &c.row() == codec && c.link_bps == *l)
                    .and_then(|c| c.total_ms)
                    .map(|s| (i as f64, s.median))
            })
            .collect();
        draw_line(&mut chart, points, codec, color)?;
    }
    finish_lines(&mut chart, &root)
}

/// Draws one named line, a dot at each point, and its legend entry.
pub(crate) fn draw_line<'a, DB, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>,
    points: Vec<(f64, f64)>,
    label: &str,
    color: RGBColor,
) -> DrawResult<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64>,
{
    chart
        .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    Ok(())
}

/// Draws the legend of a chart of lines and presents its drawing.
pub(crate) fn finish_lines<'a, DB, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>,
    root: &DrawingArea<DB, Shift>,
) -> DrawResult<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Bars per codec; `values` gives each codec's stacked parts and their names.
fn bars<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    codecs: &[String],
    parts: &[&str],
    values: &[Vec<f64>],
) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let max = values
        .iter()
        .map(|v| v.iter().sum::<f64>())
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.15;
    let n = codecs.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5f64..(n - 0.5), 0.0..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(codecs.len())
        .x_label_formatter(&|x| index_label(*x, codecs))
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for (p, name) in parts.iter().enumerate() {
        let color = PALETTE[p % PALETTE.len()];
        let rects: Vec<Rectangle<(f64, f64)>> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let base: f64 = v[..p].iter().sum();
                let x = i as f64;
                Rectangle::new([(x - 0.3, base), (x + 0.3, base + v[p])], color.filled())
            })
            .collect();
        chart
            .draw_series(rects)?
            .label(name.to_string())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    if parts.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// One chart of a guest, drawn the same on any backend.
enum Chart<'a> {
    TotalTime,
    Bars {
        title: &'a str,
        y_desc: &'a str,
        parts: &'a [&'a str],
        values: &'a [Vec<f64>],
    },
}

impl Chart<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: DrawingArea<DB, Shift>,
        guest: &str,
        cells: &[&Cell],
        codecs: &[String],
    ) -> DrawResult<()>
    where
        DB::ErrorType: 'static,
    {
        match self {
            Chart::TotalTime => total_time(root, guest, cells),
            Chart::Bars {
                title,
                y_desc,
                parts,
                values,
            } => bars(root, title, y_desc, codecs, parts, values),
        }
    }
}

pub(crate) fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes the charts for `cells` into `dir`; returns the files written.
pub fn write_charts(dir: &Path, cells: &[Cell]) -> DrawResult<Vec<PathBuf>> {
    register_font();
    let mut written = Vec::new();
    for guest in ordered(cells.iter().map(|c| c.guest.clone())) {
        let of_guest: Vec<&Cell> = cells.iter().filter(|c| c.guest == guest).collect();
        let codecs = ordered(of_guest.iter().map(|c| c.row()));
        // Wire bytes and CPU: the median over the link speeds of each codec's cells.
        let per_codec = |f: &dyn Fn(&Cell) -> f64| -> Vec<f64> {
            codecs
                .iter()
                .map(|k| {
                    let v: Vec<f64> = of_guest
                        .iter()
                        .filter(|c| &c.row() == k && c.repeats > 0)
                        .map(|c| f(c))
                        .collect();
                    super::Spread::of(&v).map_or(0.0, |s| s.median)
                })
                .collect()
        };
        let wire: Vec<Vec<f64>> = per_codec(&|c| c.wire_bytes as f64 / (1 << 20) as f64)
            .into_iter()
            .map(|v| vec![v])
            .collect();
        let src = per_codec(&|c| c.cpu_ms.source);
        let dst = per_codec(&|c| c.cpu_ms.destination);
        let cpu: Vec<Vec<f64>> = src.iter().zip(&dst).map(|(s, d)| vec![*s, *d]).collect();
        let g = slug(&guest);
        let title_wire = format!("wire bytes per codec: {guest}");
        let title_cpu = format!("CPU time per codec: {guest}");
        let charts = [
            Chart::TotalTime,
            Chart::Bars {
                title: &title_wire,
                y_desc: "MiB on the wire (median over links)",
                parts: &["wire"],
                values: &wire,
            },
            Chart::Bars {
                title: &title_cpu,
                y_desc: "CPU ms (median over links)",
                parts: &["source", "destination"],
                values: &cpu,
            },
        ];
        for (name, chart) in ["total-time", "wire-bytes", "cpu"].into_iter().zip(&charts) {
            let svg = dir.join(format!("{name}-{g}.svg"));
            let png = dir.join(format!("{name}-{g}.png"));
            chart.draw(
                SVGBackend::new(&svg, SIZE).into_drawing_area(),
                &guest,
                &of_guest,
                &codecs,
            )?;
            chart.draw(
                BitMapBackend::new(&png, SIZE).into_drawing_area(),
                &guest,
                &of_guest,
                &codecs,
            )?;
            written.push(svg);
            written.push(png);
        }
    }
    Ok(written)
}
