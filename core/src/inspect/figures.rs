//! Which charts a report gets: for one tensor, per (block size, double quant) the weight
//! histogram with the code levels of NF4 and FP4, and the two error histograms with NF4 and FP4
//! overlaid; for a model, per (block size, double quant) the SQNR heat maps of NF4 and FP4 side
//! by side. `qlora inspect` writes them as files, the web page shows them.

use super::plot::{self, HistogramChart, Markers, Series};
use super::{ConfigDetail, HeatMap, Histogram, ModelReport, QuantConfig, TensorReport};
use crate::quant::QuantType;

/// One chart of a report.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// The file `qlora inspect` writes it to: `weights_bs64_dq.svg`, `sqnr_bs128.svg`, ...
    pub file_name: String,
    /// The configurations it draws share this block size and double-quant setting.
    pub blocksize: usize,
    pub double_quant: bool,
    /// A standalone SVG document.
    pub svg: String,
}

/// The configurations grouped by (block size, double quant), in order; NF4 and FP4 of a group
/// share a chart.
fn groups<T>(items: &[T], config: impl Fn(&T) -> QuantConfig) -> Vec<(QuantConfig, Vec<&T>)> {
    let mut groups: Vec<(QuantConfig, Vec<&T>)> = Vec::new();
    for item in items {
        let c = config(item);
        match groups
            .iter_mut()
            .find(|(k, _)| (k.blocksize, k.double_quant) == (c.blocksize, c.double_quant))
        {
            Some((_, members)) => members.push(item),
            None => groups.push((c, vec![item])),
        }
    }
    groups
}

/// `bs64`, `bs64_dq`: the group's part of a file name.
fn group_tag(c: QuantConfig) -> String {
    format!(
        "bs{}{}",
        c.blocksize,
        if c.double_quant { "_dq" } else { "" }
    )
}

fn group_title(c: QuantConfig) -> String {
    format!(
        "block size {}{}",
        c.blocksize,
        if c.double_quant { ", double quant" } else { "" }
    )
}

fn type_color(q: QuantType) -> &'static str {
    match q {
        QuantType::Nf4 => plot::PALETTE[0],
        QuantType::Fp4 => plot::PALETTE[1],
    }
}

fn type_name(q: QuantType) -> String {
    q.to_string().to_uppercase()
}

fn figure(file_stem: &str, group: QuantConfig, svg: String) -> Figure {
    Figure {
        file_name: format!("{file_stem}_{}.svg", group_tag(group)),
        blocksize: group.blocksize,
        double_quant: group.double_quant,
        svg,
    }
}

/// Per (block size, double quant): the weight histogram with the code levels of each type,
/// and the error and per-block relative error histograms of each type overlaid.
pub fn tensor_figures(report: &TensorReport) -> Vec<Figure> {
    let mut figures = Vec::new();
    for (group, members) in groups(&report.configs, |d| d.summary.config) {
        let title = group_title(group);
        let series = |histogram: fn(&ConfigDetail) -> &Histogram| {
            members
                .iter()
                .map(|d| Series {
                    label: type_name(d.summary.config.quant_type),
                    color: type_color(d.summary.config.quant_type),
                    histogram: histogram(d),
                })
                .collect()
        };
        let weights = HistogramChart {
            title: format!("{}: weights and 4-bit levels ({title})", report.name),
            x_label: "weight".into(),
            series: vec![Series {
                label: "weights".into(),
                color: plot::PALETTE[2],
                histogram: &report.weight_histogram,
            }],
            markers: members
                .iter()
                .map(|d| Markers {
                    label: format!(
                        "{} levels × median absmax {:.3e}",
                        type_name(d.summary.config.quant_type),
                        d.code_scale
                    ),
                    color: type_color(d.summary.config.quant_type),
                    xs: d.code_levels.clone(),
                })
                .collect(),
        };
        let error = HistogramChart {
            title: format!("{}: quantization error ({title})", report.name),
            x_label: "w − dequant(quant(w))".into(),
            series: series(|d| &d.error_histogram),
            markers: Vec::new(),
        };
        let block = HistogramChart {
            title: format!("{}: per-block relative error ({title})", report.name),
            x_label: "‖w − ŵ‖₂ / ‖w‖₂ of a block".into(),
            series: series(|d| &d.block_rel_error_histogram),
            markers: Vec::new(),
        };
        figures.push(figure("weights", group, plot::histogram_svg(&weights)));
        figures.push(figure("error", group, plot::histogram_svg(&error)));
        figures.push(figure(
            "block_rel_error",
            group,
            plot::histogram_svg(&block),
        ));
    }
    figures
}

/// Per (block size, double quant): the SQNR heat maps of NF4 and FP4 side by side.
pub fn model_figures(report: &ModelReport) -> Vec<Figure> {
    groups(&report.heat_maps, |m| m.config)
        .into_iter()
        .map(|(group, maps)| {
            let names: Vec<String> = maps
                .iter()
                .map(|m| type_name(m.config.quant_type))
                .collect();
            let panels: Vec<(&str, &HeatMap)> = names
                .iter()
                .map(String::as_str)
                .zip(maps.iter().copied())
                .collect();
            let title = format!("SQNR (dB) by layer and module, {}", group_title(group));
            figure("sqnr", group, plot::heat_maps_svg(&title, &panels))
        })
        .collect()
}
