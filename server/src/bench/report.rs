//! The bench's output: a table for people and a CSV for tools, with the same columns.

use std::fmt::Write as _;

use super::bytes::{KvDtype, WeightStorage};
use super::cases::{Case, Measured};
use super::copy::CopyBandwidth;
use crate::engine::model::config::{AttentionKind, ModelConfig};

#[derive(Debug)]
pub enum Outcome {
    Ran(Measured),
    Skipped(String),
    /// The case started and an engine step failed; later cases still run.
    Failed(String),
}

#[derive(Debug)]
pub struct Row {
    pub case: Case,
    pub outcome: Outcome,
}

/// Everything one run found, with what it ran on.
#[derive(Debug)]
pub struct Report {
    pub device: &'static str,
    pub device_name: String,
    pub copy: CopyBandwidth,
    pub config_source: String,
    pub layers: usize,
    pub full_layers: usize,
    pub layer_mix: String,
    pub weights_as: WeightStorage,
    pub kv_dtype: KvDtype,
    pub shared_context: bool,
    /// Contexts written as random KV (`--kv-fill random`) instead of prefilled.
    pub random_fill: bool,
    /// Tensor-parallel ranks (rank r on GPU r); bytes are the whole model's, and % of copy is
    /// against this many times GPU 0's copy bandwidth.
    pub world_size: usize,
    /// How a tensor-parallel run's small all-reduces travel (peer memory or NCCL only).
    pub all_reduce: Option<String>,
    pub pool_tokens: usize,
    pub chunk: usize,
    pub iters: usize,
    pub warmup: usize,
    pub date: String,
    pub rows: Vec<Row>,
}

/// "2 sliding, 21 CSA, 20 HCA".
pub fn layer_mix(cfg: &ModelConfig) -> String {
    let count = |k| cfg.layer_types.iter().filter(|&&t| t == k).count();
    format!(
        "{} sliding, {} CSA, {} HCA",
        count(AttentionKind::Sliding),
        count(AttentionKind::Csa),
        count(AttentionKind::Hca)
    )
}

/// The derived figures of one row that ran.
pub struct Figures {
    pub step_s: f64,
    pub min_s: f64,
    pub tok_s: f64,
    pub bytes: f64,
    pub weight_bytes: f64,
    pub kv_bytes: f64,
    pub gb_s: f64,
    pub pct_of_copy: f64,
    /// Step time scaled to the full depth: `step_s * full_layers / layers` (an estimate).
    pub scaled_step_s: f64,
    pub scaled_tok_s: f64,
    /// Modelled bytes of the unit at the full depth.
    pub full_depth_bytes: f64,
    /// The time moving `full_depth_bytes` at this row's achieved GB/s would take (an estimate
    /// that weighs the layer types as the full model has them).
    pub full_depth_step_s_at_gb_s: f64,
}

impl Report {
    pub fn figures(&self, m: &Measured) -> Figures {
        let step_s = m.mean_s();
        let bytes = m.bytes.total();
        let gb_s = bytes / step_s.max(1e-12) / 1e9;
        let scale = self.full_layers as f64 / self.layers.max(1) as f64;
        Figures {
            step_s,
            min_s: m.min_s(),
            tok_s: m.tokens as f64 / step_s.max(1e-12),
            bytes,
            weight_bytes: bytes - m.bytes.kv_read,
            kv_bytes: m.bytes.kv_read,
            gb_s,
            pct_of_copy: 100.0 * gb_s / (self.copy.gb_s * self.world_size.max(1) as f64).max(1e-12),
            scaled_step_s: step_s * scale,
            scaled_tok_s: m.tokens as f64 / (step_s * scale).max(1e-12),
            full_depth_bytes: m.full_depth_bytes.total(),
            full_depth_step_s_at_gb_s: m.full_depth_bytes.total() / (gb_s * 1e9).max(1e-12),
        }
    }

    /// The header lines and the table.
    pub fn table(&self) -> String {
        let mut s = self.table_header();
        for r in &self.rows {
            s.push_str(&self.table_row(r));
        }
        s
    }

    /// What the run ran on, and the column titles.
    pub fn table_header(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "dspark-server bench  {}", self.date);
        let _ = writeln!(s, "device: {} ({})", self.device, self.device_name);
        let _ = writeln!(
            s,
            "copy bandwidth: {:.1} GB/s (2 x {} MiB per copy: read + write, best of 5)",
            self.copy.gb_s,
            self.copy.buffer_bytes >> 20
        );
        let _ = writeln!(
            s,
            "shape: {}; layers run: {} of {} ({}){}",
            self.config_source,
            self.layers,
            self.full_layers,
            self.layer_mix,
            if self.layers < self.full_layers {
                "; 'scaled' columns = measured x full/run layers (estimate)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "bytes model: weights as {}, KV entries as {}, expected distinct experts under \
             uniform routing; KV {}",
            self.weights_as.name(),
            self.kv_dtype.name(),
            match (self.shared_context, self.random_fill) {
                (true, false) => "context shared by the sequences of a case (--shared-context)",
                (false, false) => "context filled per sequence",
                (true, true) => {
                    "context shared by the sequences of a case, written as random KV \
                     (--kv-fill random: timing only)"
                }
                (false, true) => {
                    "context per sequence, written as random KV (--kv-fill random: timing only)"
                }
            }
        );
        if self.world_size > 1 {
            let _ = writeln!(
                s,
                "tensor parallel: {} ranks in this process (rank r on device r); bytes are the \
                 whole model's, % copy is against {} x the copy bandwidth above",
                self.world_size, self.world_size
            );
            if let Some(how) = &self.all_reduce {
                let _ = writeln!(s, "small all-reduces: {how}");
            }
        }
        let _ = writeln!(
            s,
            "pool: {} tokens; prefill chunk {}; {} timed + {} warm-up repetitions per case; \
             DSpark acceptance: not applicable (dummy weights)",
            self.pool_tokens, self.chunk, self.iters, self.warmup
        );
        let scaled = format!("ms@{}L", self.full_layers);
        let scaled_tok = format!("tok/s@{}L", self.full_layers);
        let _ = writeln!(
            s,
            "{:<22} {:>5} {:>8} {:>7} {:>5} {:>11} {:>11} {:>10} {:>9} {:>7} {:>11} {:>11}",
            "case",
            "batch",
            "context",
            "tokens",
            "steps",
            "step ms",
            "tok/s",
            "bytes",
            "GB/s",
            "% copy",
            scaled,
            scaled_tok
        );
        s
    }

    /// One line of the table.
    pub fn table_row(&self, r: &Row) -> String {
        let mut s = String::new();
        {
            let head = format!(
                "{:<22} {:>5} {:>8}",
                r.case.label(),
                r.case.batch(),
                r.case.context()
            );
            match &r.outcome {
                Outcome::Skipped(why) => {
                    let _ = writeln!(s, "{head} skipped: {why}");
                }
                Outcome::Failed(why) => {
                    let _ = writeln!(s, "{head} FAILED: {why}");
                }
                Outcome::Ran(m) => {
                    let f = self.figures(m);
                    let _ = writeln!(
                        s,
                        "{head} {:>7} {:>5} {:>11.3} {:>11.1} {:>10} {:>9.2} {:>6.1}% {:>11.3} \
                         {:>11.1}",
                        m.tokens,
                        m.steps,
                        f.step_s * 1e3,
                        f.tok_s,
                        human_bytes(f.bytes),
                        f.gb_s,
                        f.pct_of_copy,
                        f.scaled_step_s * 1e3,
                        f.scaled_tok_s
                    );
                }
            }
        }
        s
    }

    /// CSV: the table's columns, then the run's context on every row.
    pub fn csv(&self) -> String {
        let mut s = String::from(CSV_HEADER);
        s.push('\n');
        for r in &self.rows {
            s.push_str(&self.csv_row(r));
        }
        s
    }

    /// One CSV line (with its newline).
    pub fn csv_row(&self, r: &Row) -> String {
        let mut s = String::new();
        {
            let c = &r.case;
            let _ = write!(
                s,
                "{},{},{},{},",
                c.label(),
                c.kind(),
                c.batch(),
                c.context()
            );
            match &r.outcome {
                Outcome::Ran(m) => {
                    let f = self.figures(m);
                    let _ = write!(
                        s,
                        "{},{},{:.6},{:.6},{:.3},{:.0},{:.0},{:.0},{:.4},{:.3},{:.6},{:.3},{:.0},\
                         {:.6},{:.3},ok,",
                        m.tokens,
                        m.steps,
                        f.step_s * 1e3,
                        f.min_s * 1e3,
                        f.tok_s,
                        f.bytes,
                        f.weight_bytes,
                        f.kv_bytes,
                        f.gb_s,
                        f.pct_of_copy,
                        f.scaled_step_s * 1e3,
                        f.scaled_tok_s,
                        f.full_depth_bytes,
                        f.full_depth_step_s_at_gb_s * 1e3,
                        m.setup.as_secs_f64(),
                    );
                }
                Outcome::Skipped(why) => {
                    let _ = write!(
                        s,
                        ",,,,,,,,,,,,,,,{},",
                        csv_field(&format!("skipped: {why}"))
                    );
                }
                Outcome::Failed(why) => {
                    let _ = write!(
                        s,
                        ",,,,,,,,,,,,,,,{},",
                        csv_field(&format!("failed: {why}"))
                    );
                }
            }
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{},{},{:.3},{}",
                self.device,
                csv_field(&self.device_name),
                self.world_size,
                self.layers,
                self.full_layers,
                self.weights_as.name(),
                self.kv_dtype.name(),
                if self.shared_context {
                    "shared"
                } else {
                    "per-sequence"
                },
                self.chunk,
                self.copy.gb_s,
                self.date
            );
        }
        s
    }
}

pub const CSV_HEADER: &str = "case,kind,batch,context,tokens,steps,step_ms,min_step_ms,tok_s,\
bytes,weight_bytes,kv_bytes,gb_s,pct_of_copy,scaled_step_ms,scaled_tok_s,full_depth_bytes,\
full_depth_ms_at_gb_s,setup_s,status,\
device,device_name,world_size,layers,full_layers,weights_as,kv_dtype,kv_context,prefill_chunk,copy_gb_s,date";

/// Quotes a field that holds a comma or quote.
fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

/// 1.23 GB, 45.6 MB, 789 kB (decimal units, like the GB/s column).
fn human_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::bytes::StepBytes;
    use std::time::Duration;

    /// One CSV line's fields, read by the `csv` crate (an independent reader of what we write).
    fn split_csv(line: &str) -> Vec<String> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(line.as_bytes());
        let record = reader
            .records()
            .next()
            .expect("one record")
            .expect("valid CSV");
        record.iter().map(String::from).collect()
    }

    fn report(rows: Vec<Row>) -> Report {
        Report {
            device: "cpu",
            device_name: "Test CPU, 2 threads".into(),
            copy: CopyBandwidth {
                gb_s: 10.0,
                buffer_bytes: 1 << 30,
                device_name: "x".into(),
            },
            config_source: "c.json".into(),
            layers: 2,
            full_layers: 4,
            layer_mix: "1 sliding, 1 CSA, 0 HCA".into(),
            weights_as: WeightStorage::F32,
            kv_dtype: KvDtype::F32,
            shared_context: false,
            random_fill: false,
            world_size: 1,
            all_reduce: None,
            pool_tokens: 1024,
            chunk: 8192,
            iters: 2,
            warmup: 1,
            date: "2026-11-28T00:00:00Z".into(),
            rows,
        }
    }

    #[test]
    fn figures_and_csv_columns() {
        let m = Measured {
            tokens: 4,
            steps: 1,
            times: vec![Duration::from_millis(10), Duration::from_millis(30)],
            bytes: StepBytes {
                dense_weights: 1e8,
                kv_read: 1e8,
                ..StepBytes::default()
            },
            full_depth_bytes: StepBytes {
                dense_weights: 2e8,
                kv_read: 2e8,
                ..StepBytes::default()
            },
            setup: Duration::from_secs(1),
            setup_tokens: 100,
        };
        let r = report(vec![
            Row {
                case: Case::Decode {
                    batch: 4,
                    context: 100,
                },
                outcome: Outcome::Ran(m),
            },
            Row {
                case: Case::Prefill { prompt: 5000 },
                outcome: Outcome::Skipped("above --max-context 10, really".into()),
            },
        ]);
        let Outcome::Ran(m) = &r.rows[0].outcome else {
            unreachable!()
        };
        let f = r.figures(m);
        // 200 MB in 20 ms = 10 GB/s = the whole copy bandwidth; 4 tokens / 20 ms.
        assert!((f.gb_s - 10.0).abs() < 1e-9);
        assert!((f.pct_of_copy - 100.0).abs() < 1e-9);
        assert!((f.tok_s - 200.0).abs() < 1e-9);
        assert!((f.scaled_step_s - 0.040).abs() < 1e-12);
        // 400 MB at 10 GB/s.
        assert!((f.full_depth_step_s_at_gb_s - 0.040).abs() < 1e-12);
        let csv = r.csv();
        let lines: Vec<&str> = csv.lines().collect();
        let n = CSV_HEADER.split(',').count();
        assert_eq!(lines.len(), 3);
        assert_eq!(split_csv(lines[1]).len(), n, "{}", lines[1]);
        assert_eq!(split_csv(lines[2]).len(), n, "{}", lines[2]);
        assert_eq!(split_csv(lines[2])[21], "Test CPU, 2 threads");
        assert!(lines[1].starts_with("decode:4:100,decode,4,100,4,1,20.000000,10.000000,"));
        assert!(lines[2].contains("\"skipped: above --max-context 10, really\""));
        assert!(lines[2].contains("\"Test CPU, 2 threads\""));
        let table = r.table();
        assert!(table.contains("skipped: above --max-context 10"), "{table}");
        assert!(table.contains("ms@4L"), "{table}");
    }
}
