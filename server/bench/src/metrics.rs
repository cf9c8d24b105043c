//! Prometheus text exposition parsing, speculative-decoding acceptance from vLLM's counters, and
//! server memory (RSS) readings.

use std::collections::BTreeMap;

use serde::Serialize;

/// vLLM's speculative-decoding counter names (dspark exposes the same).
pub const SPEC_DRAFTS: &str = "vllm:spec_decode_num_drafts_total";
pub const SPEC_DRAFT_TOKENS: &str = "vllm:spec_decode_num_draft_tokens_total";
pub const SPEC_ACCEPTED: &str = "vllm:spec_decode_num_accepted_tokens_total";
pub const SPEC_ACCEPTED_PER_POS: &str = "vllm:spec_decode_num_accepted_tokens_per_pos_total";
/// The standard process collector's resident memory gauge.
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MetricsError {
    #[error("metrics line {line}: {reason}: {text:?}")]
    Syntax {
        line: usize,
        reason: &'static str,
        text: String,
    },
}

/// One sample line: `name{labels} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parse the Prometheus text format (0.0.4). Comments and blank lines are skipped.
pub fn parse(text: &str) -> Result<Vec<Sample>, MetricsError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason| MetricsError::Syntax {
            line: i + 1,
            reason,
            text: raw.to_string(),
        };
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .ok_or_else(|| err("no value"))?;
        let name = &line[..name_end];
        if name.is_empty() {
            return Err(err("empty metric name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after_brace) = rest.strip_prefix('{') {
            let (parsed, remaining) = parse_labels(after_brace).ok_or_else(|| err("bad labels"))?;
            labels = parsed;
            rest = remaining;
        }
        let value_text = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| err("no value"))?;
        let value = parse_value(value_text).ok_or_else(|| err("bad value"))?;
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(out)
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Parses `a="x",b="y"}` (the opening brace already consumed); returns labels and the rest.
fn parse_labels(s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = s.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Some((labels, r));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        rest = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (idx, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break idx,
                other => value.push(other),
            }
        };
        labels.insert(key, value);
        rest = rest[end + 1..].trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
        }
    }
}

/// Sum of a metric over all its label sets (vLLM labels by model and engine); None if absent.
pub fn sum(samples: &[Sample], name: &str) -> Option<f64> {
    let mut found = false;
    let total = samples
        .iter()
        .filter(|s| s.name == name)
        .inspect(|_| found = true)
        .map(|s| s.value)
        .sum();
    found.then_some(total)
}

/// Sum of a metric grouped by one label's value.
pub fn sum_by(samples: &[Sample], name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name) {
        if let Some(v) = s.labels.get(label) {
            *out.entry(v.clone()).or_insert(0.0) += s.value;
        }
    }
    out
}

/// A snapshot of the speculative-decoding counters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SpecCounters {
    pub drafts: f64,
    pub draft_tokens: f64,
    pub accepted_tokens: f64,
    /// Accepted tokens at draft position i (0-based), by position.
    pub accepted_per_pos: BTreeMap<usize, f64>,
}

impl SpecCounters {
    /// None when the server exposes no speculative-decoding counters (speculation off).
    pub fn from_samples(samples: &[Sample]) -> Option<Self> {
        let drafts = sum(samples, SPEC_DRAFTS)?;
        let accepted_per_pos = sum_by(samples, SPEC_ACCEPTED_PER_POS, "position")
            .into_iter()
            .filter_map(|(k, v)| k.parse::<usize>().ok().map(|p| (p, v)))
            .collect();
        Some(Self {
            drafts,
            draft_tokens: sum(samples, SPEC_DRAFT_TOKENS).unwrap_or(0.0),
            accepted_tokens: sum(samples, SPEC_ACCEPTED).unwrap_or(0.0),
            accepted_per_pos,
        })
    }
}

/// Acceptance over a run: the difference of two counter snapshots.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Acceptance {
    pub drafts: f64,
    pub draft_tokens: f64,
    pub accepted_tokens: f64,
    /// accepted / drafted tokens.
    pub acceptance_rate: f64,
    /// Tokens produced per verification step, vLLM's definition: 1 + accepted / drafts
    /// (the target model always contributes one token).
    pub mean_acceptance_length: f64,
    /// Fraction of drafts whose token at position i was accepted.
    pub per_position_rate: Vec<f64>,
}

impl Acceptance {
    /// None when no draft was made between the snapshots.
    pub fn between(before: &SpecCounters, after: &SpecCounters) -> Option<Self> {
        let drafts = after.drafts - before.drafts;
        if drafts <= 0.0 {
            return None;
        }
        let draft_tokens = after.draft_tokens - before.draft_tokens;
        let accepted_tokens = after.accepted_tokens - before.accepted_tokens;
        let per_position_rate = after
            .accepted_per_pos
            .iter()
            .map(|(pos, v)| (v - before.accepted_per_pos.get(pos).unwrap_or(&0.0)) / drafts)
            .collect();
        Some(Self {
            drafts,
            draft_tokens,
            accepted_tokens,
            acceptance_rate: if draft_tokens > 0.0 {
                accepted_tokens / draft_tokens
            } else {
                0.0
            },
            mean_acceptance_length: 1.0 + accepted_tokens / drafts,
            per_position_rate,
        })
    }
}

/// Resident set size of a local process from /proc/PID/status (`VmRSS`, reported in kB).
pub fn proc_rss_bytes(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vmrss(&status).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no VmRSS line in /proc/{pid}/status"),
        )
    })
}

fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shape of vLLM 0.11's /metrics for these counters (labels, HELP/TYPE lines, _created series).
    const VLLM_METRICS: &str = r#"# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="ds"} 100.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="ds"} 20.0
vllm:spec_decode_num_drafts_created{engine="0",model_name="ds"} 1.7e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="ds"} 600.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="ds"} 360.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="ds",position="0"} 110.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="ds",position="1"} 90.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="ds",position="10"} 1.0
process_resident_memory_bytes 1.2345e+09
weird_label{path="a\"b\\c,d}",x="1"} NaN 1700000000000
"#;

    #[test]
    fn parses_labels_values_and_timestamps() {
        let s = parse(VLLM_METRICS).unwrap();
        assert_eq!(s.len(), 10);
        assert_eq!(s[0].name, SPEC_DRAFTS);
        assert_eq!(s[0].labels["engine"], "0");
        assert_eq!(sum(&s, PROCESS_RSS), Some(1.2345e9));
        let weird = s.iter().find(|x| x.name == "weird_label").unwrap();
        assert_eq!(weird.labels["path"], "a\"b\\c,d}");
        assert_eq!(weird.labels["x"], "1");
        assert!(weird.value.is_nan());
        assert_eq!(sum(&s, "absent"), None);
    }

    #[test]
    fn malformed_lines_are_errors_not_panics() {
        for bad in ["novalue", "m{a=\"x\" 1", "m{a=x} 1", "m abc", "{a=\"b\"} 1"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn acceptance_is_counter_difference() {
        let before = SpecCounters::from_samples(&parse(VLLM_METRICS).unwrap()).unwrap();
        assert_eq!(before.drafts, 120.0); // summed over engines
        assert_eq!(before.accepted_per_pos.len(), 3);
        let after_text = VLLM_METRICS
            .replace("} 100.0", "} 140.0") // +40 drafts
            .replace("} 600.0", "} 800.0") // +200 draft tokens
            .replace("} 360.0", "} 480.0") // +120 accepted
            .replace("position=\"0\"} 110.0", "position=\"0\"} 146.0") // +36
            .replace("position=\"1\"} 90.0", "position=\"1\"} 118.0"); // +28
        let after = SpecCounters::from_samples(&parse(&after_text).unwrap()).unwrap();
        let a = Acceptance::between(&before, &after).unwrap();
        assert_eq!(a.drafts, 40.0);
        assert_eq!(a.draft_tokens, 200.0);
        assert!((a.acceptance_rate - 0.6).abs() < 1e-12);
        assert!((a.mean_acceptance_length - 4.0).abs() < 1e-12);
        // Positions are ordered numerically (0, 1, 10), not as strings.
        assert_eq!(a.per_position_rate, vec![0.9, 0.7, 0.0]);
        assert_eq!(Acceptance::between(&after, &after), None);
        assert_eq!(SpecCounters::from_samples(&[]), None);
    }

    #[test]
    fn vmrss_from_proc_status() {
        let status = "Name:\tdspark\nVmPeak:\t  999 kB\nVmRSS:\t  2048 kB\n";
        assert_eq!(parse_vmrss(status), Some(2048 * 1024));
        assert!(proc_rss_bytes(std::process::id()).unwrap() > 0);
    }
}
