//! The inspector's numbers as CSV: one row per tensor and configuration, every float in full
//! precision (Rust's shortest round-trip form), so a spreadsheet sees what `stats.json` holds.

use std::fmt::Write;

use qlora_core::inspect::{ErrorSummary, InspectReport, Sqnr};

const HEADER: &str = "tensor,quant_type,blocksize,double_quant,numel,mse,mean_abs_error,\
max_abs_error,sqnr_db,blocks,zero_blocks,block_rel_error_p50,block_rel_error_p90,\
block_rel_error_p99,block_rel_error_max";

/// SQNR as a number: `inf` when lossless, empty without signal.
pub fn sqnr_cell(sqnr: Sqnr) -> String {
    match sqnr {
        Sqnr::Db(db) => db.to_string(),
        Sqnr::Lossless => "inf".into(),
        Sqnr::NoSignal => String::new(),
    }
}

/// A tensor name as one CSV field (quoted when it holds a comma or a quote).
fn field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

fn row(out: &mut String, tensor: &str, s: &ErrorSummary) {
    let q = s.block_rel_error;
    let quantile = |pick: fn(&qlora_core::inspect::Quantiles) -> f64| {
        q.as_ref().map(|q| pick(q).to_string()).unwrap_or_default()
    };
    writeln!(
        out,
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        field(tensor),
        s.config.quant_type,
        s.config.blocksize,
        s.config.double_quant,
        s.numel,
        s.mse,
        s.mean_abs_error,
        s.max_abs_error,
        sqnr_cell(s.sqnr),
        s.blocks,
        s.zero_blocks,
        quantile(|q| q.p50),
        quantile(|q| q.p90),
        quantile(|q| q.p99),
        quantile(|q| q.max),
    )
    .expect("writing to a String");
}

/// Every error summary of the report, with a header line.
pub fn report_csv(report: &InspectReport) -> String {
    let mut out = format!("{HEADER}\n");
    match report {
        InspectReport::Tensor(t) => {
            for d in &t.configs {
                row(&mut out, &t.name, &d.summary);
            }
        }
        InspectReport::Model(m) => {
            for t in &m.tensors {
                for s in &t.configs {
                    row(&mut out, &t.name, s);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use qlora_core::inspect::{inspect_tensor, quant_configs};
    use qlora_core::quant::FloatSlice;

    use super::*;

    #[test]
    fn one_row_per_configuration_in_full_precision() {
        let w: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect();
        let configs = quant_configs(&[64]);
        let report = inspect_tensor("a,b", FloatSlice::F32(&w), &[4, 64], &configs, 11).unwrap();
        let first = report.configs[0].summary.clone();
        let csv = report_csv(&InspectReport::Tensor(report));
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 1 + configs.len());
        assert_eq!(lines[0].split(',').count(), 15);
        // The cells after the quoted tensor name.
        let cells: Vec<&str> = lines[1].split_once("\",").unwrap().1.split(',').collect();
        assert!(
            lines[1].starts_with("\"a,b\",nf4,64,false,256,"),
            "{}",
            lines[1]
        );
        assert_eq!(cells[4].parse::<f64>().unwrap(), first.mse);
        assert_eq!(cells[7], sqnr_cell(first.sqnr));
    }

    #[test]
    fn sqnr_cells() {
        assert_eq!(sqnr_cell(Sqnr::Db(20.5)), "20.5");
        assert_eq!(sqnr_cell(Sqnr::Lossless), "inf");
        assert_eq!(sqnr_cell(Sqnr::NoSignal), "");
    }
}
