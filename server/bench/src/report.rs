//! Results: per-group summaries, soak windows, and their JSON / CSV / terminal forms.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::client::RequestRecord;
use crate::metrics::Acceptance;
use crate::stats::{Histogram, Summary};

/// The aggregate of one group of requests (a prompt set, a concurrency level, a depth...).
#[derive(Debug, Clone, Serialize)]
pub struct GroupSummary {
    pub group: String,
    /// The swept quantity: concurrency, prompt depth, arrival rate, or the group's index.
    pub x: f64,
    /// Streams in flight for closed-loop groups.
    pub concurrency: Option<usize>,
    pub requests: usize,
    pub ok: usize,
    pub errors: BTreeMap<String, u64>,
    /// First request start to last request end.
    pub wall_s: f64,
    pub output_tokens: u64,
    /// Output tokens of successful requests per second of wall time.
    pub aggregate_tok_s: f64,
    /// aggregate / concurrency (closed-loop groups).
    pub per_stream_tok_s: Option<f64>,
    pub ok_requests_per_s: f64,
    pub prompt_tokens_mean: Option<f64>,
    pub ttft_s: Summary,
    pub tpot_s: Summary,
    pub itl_s: Summary,
    pub e2e_s: Summary,
    /// Per-request decode speed; `max` is the peak single-stream figure.
    pub decode_tok_s: Summary,
    pub acceptance: Option<Acceptance>,
}

impl GroupSummary {
    pub fn of(group: &str, x: f64, concurrency: Option<usize>, recs: &[RequestRecord]) -> Self {
        let ok: Vec<&RequestRecord> = recs.iter().filter(|r| r.ok).collect();
        let start = recs.iter().map(|r| r.start_s).fold(f64::INFINITY, f64::min);
        let end = recs
            .iter()
            .map(|r| r.start_s + r.e2e_s)
            .fold(f64::NEG_INFINITY, f64::max);
        let wall_s = if recs.is_empty() { 0.0 } else { end - start };
        let output_tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
        let rate = |n: f64| if wall_s > 0.0 { n / wall_s } else { 0.0 };
        let aggregate_tok_s = rate(output_tokens as f64);
        let prompt: Vec<f64> = ok
            .iter()
            .filter_map(|r| r.prompt_tokens.map(|p| p as f64))
            .collect();
        Self {
            group: group.to_string(),
            x,
            concurrency,
            requests: recs.len(),
            ok: ok.len(),
            errors: error_counts(recs),
            wall_s,
            output_tokens,
            aggregate_tok_s,
            per_stream_tok_s: concurrency.map(|c| aggregate_tok_s / c.max(1) as f64),
            ok_requests_per_s: rate(ok.len() as f64),
            prompt_tokens_mean: (!prompt.is_empty())
                .then(|| prompt.iter().sum::<f64>() / prompt.len() as f64),
            ttft_s: Summary::of(ok.iter().filter_map(|r| r.ttft_s)),
            tpot_s: Summary::of(ok.iter().filter_map(|r| r.tpot_s)),
            itl_s: Summary::of(ok.iter().flat_map(|r| r.itl_s.iter().copied())),
            e2e_s: Summary::of(ok.iter().map(|r| r.e2e_s)),
            decode_tok_s: Summary::of(ok.iter().filter_map(|r| r.decode_tok_s)),
            acceptance: None,
        }
    }
}

pub fn error_counts(recs: &[RequestRecord]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for e in recs.iter().filter_map(|r| r.error.as_ref()) {
        *m.entry(e.clone()).or_insert(0) += 1;
    }
    m
}

/// One time window of a soak run (requests counted by completion time).
#[derive(Debug, Clone, Serialize)]
pub struct SoakWindow {
    pub start_s: f64,
    pub end_s: f64,
    pub completed: usize,
    pub ok: usize,
    pub errors: BTreeMap<String, u64>,
    pub e2e_p50_s: f64,
    pub e2e_p99_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    pub output_tok_s: f64,
    /// Highest server RSS sampled in the window, if a source was given.
    pub rss_max_bytes: Option<u64>,
}

/// One RSS reading of the server during a soak.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RssSample {
    pub t_s: f64,
    pub bytes: u64,
}

/// Everything a run produced; written as `<scenario>.json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub started_unix_s: f64,
    pub base_url: String,
    pub model: String,
    /// Flags and resolved defaults of the run.
    pub settings: Value,
    pub groups: Vec<GroupSummary>,
    pub errors: BTreeMap<String, u64>,
    pub itl_histogram_s: Histogram,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<SoakWindow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rss: Vec<RssSample>,
    /// Groups skipped before sending (e.g. a depth over the served max_model_len).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    pub requests: Vec<RequestRecord>,
}

impl Report {
    /// Write `<scenario>.json`, `<scenario>_groups.csv`, `<scenario>_requests.csv` and, for a
    /// soak, `<scenario>_windows.csv`. Returns the paths written.
    pub fn write(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let mut written = Vec::new();
        let mut put = |name: String, text: String| -> std::io::Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, text)?;
            written.push(p);
            Ok(())
        };
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        put(format!("{}.json", self.scenario), json)?;
        put(
            format!("{}_groups.csv", self.scenario),
            groups_csv(&self.groups),
        )?;
        put(
            format!("{}_requests.csv", self.scenario),
            requests_csv(&self.requests),
        )?;
        if !self.windows.is_empty() {
            put(
                format!("{}_windows.csv", self.scenario),
                windows_csv(&self.windows),
            )?;
        }
        Ok(written)
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

fn errors_field(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

pub fn groups_csv(groups: &[GroupSummary]) -> String {
    let mut s = String::from(
        "group,x,concurrency,requests,ok,errors,wall_s,output_tokens,aggregate_tok_s,per_stream_tok_s,\
ok_requests_per_s,prompt_tokens_mean,ttft_mean_s,ttft_p50_s,ttft_p99_s,tpot_mean_s,tpot_p50_s,tpot_p99_s,\
itl_p50_s,itl_p99_s,e2e_p50_s,e2e_p99_s,decode_tok_s_mean,decode_tok_s_peak,acceptance_rate,mean_acceptance_length\n",
    );
    for g in groups {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            csv_field(&g.group),
            g.x,
            opt(g.concurrency),
            g.requests,
            g.ok,
            csv_field(&errors_field(&g.errors)),
            g.wall_s,
            g.output_tokens,
            g.aggregate_tok_s,
            opt(g.per_stream_tok_s),
            g.ok_requests_per_s,
            opt(g.prompt_tokens_mean),
            g.ttft_s.mean,
            g.ttft_s.p50,
            g.ttft_s.p99,
            g.tpot_s.mean,
            g.tpot_s.p50,
            g.tpot_s.p99,
            g.itl_s.p50,
            g.itl_s.p99,
            g.e2e_s.p50,
            g.e2e_s.p99,
            g.decode_tok_s.mean,
            g.decode_tok_s.max,
            opt(g.acceptance.as_ref().map(|a| a.acceptance_rate)),
            opt(g.acceptance.as_ref().map(|a| a.mean_acceptance_length)),
        );
    }
    s
}

pub fn requests_csv(recs: &[RequestRecord]) -> String {
    let mut s = String::from(
        "group,prompt_id,start_s,ok,error,ttft_s,e2e_s,output_tokens,prompt_tokens,usage_reported,\
text_chunks,tpot_s,decode_tok_s,error_detail\n",
    );
    for r in recs {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            csv_field(&r.group),
            csv_field(&r.prompt_id),
            r.start_s,
            r.ok,
            opt(r.error.as_deref()),
            opt(r.ttft_s),
            r.e2e_s,
            r.output_tokens,
            opt(r.prompt_tokens),
            r.usage_reported,
            r.text_chunks,
            opt(r.tpot_s),
            opt(r.decode_tok_s),
            csv_field(r.error_detail.as_deref().unwrap_or("")),
        );
    }
    s
}

pub fn windows_csv(ws: &[SoakWindow]) -> String {
    let mut s = String::from(
        "start_s,end_s,completed,ok,errors,e2e_p50_s,e2e_p99_s,ttft_p50_s,ttft_p99_s,output_tok_s,rss_max_bytes\n",
    );
    for w in ws {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{}",
            w.start_s,
            w.end_s,
            w.completed,
            w.ok,
            csv_field(&errors_field(&w.errors)),
            w.e2e_p50_s,
            w.e2e_p99_s,
            w.ttft_p50_s,
            w.ttft_p99_s,
            w.output_tok_s,
            opt(w.rss_max_bytes),
        );
    }
    s
}

/// The human summary printed on stdout.
pub fn summary_table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} against {} (model {})",
        r.scenario, r.base_url, r.model
    );
    let _ = writeln!(
        s,
        "{:<16} {:>5} {:>5} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>7} {:>7}",
        "group",
        "reqs",
        "ok",
        "err",
        "ttft_p50",
        "ttft_p99",
        "tpot_p50",
        "itl_p99",
        "dec_mean",
        "dec_peak",
        "agg_tok/s",
        "strm_tok/s",
        "acc",
        "acc_len"
    );
    for g in &r.groups {
        let (acc, len) = g.acceptance.as_ref().map_or(("-".into(), "-".into()), |a| {
            (
                format!("{:.1}%", a.acceptance_rate * 100.0),
                format!("{:.2}", a.mean_acceptance_length),
            )
        });
        let _ = writeln!(
            s,
            "{:<16} {:>5} {:>5} {:>5} {:>7.0}ms {:>7.0}ms {:>7.1}ms {:>7.1}ms {:>9.1} {:>9.1} {:>10.1} {:>10} {:>7} {:>7}",
            g.group,
            g.requests,
            g.ok,
            g.requests - g.ok,
            g.ttft_s.p50 * 1e3,
            g.ttft_s.p99 * 1e3,
            g.tpot_s.p50 * 1e3,
            g.itl_s.p99 * 1e3,
            g.decode_tok_s.mean,
            g.decode_tok_s.max,
            g.aggregate_tok_s,
            g.per_stream_tok_s.map_or("-".into(), |v| format!("{v:.1}")),
            acc,
            len
        );
    }
    if !r.windows.is_empty() {
        let _ = writeln!(
            s,
            "\n{:>8} {:>8} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10}  errors",
            "from_s", "to_s", "done", "ok", "e2e_p50", "e2e_p99", "tok/s", "rss_MiB"
        );
        for w in &r.windows {
            let _ = writeln!(
                s,
                "{:>8.0} {:>8.0} {:>6} {:>6} {:>9.2}s {:>9.2}s {:>10.1} {:>10}  {}",
                w.start_s,
                w.end_s,
                w.completed,
                w.ok,
                w.e2e_p50_s,
                w.e2e_p99_s,
                w.output_tok_s,
                w.rss_max_bytes
                    .map_or("-".into(), |b| format!("{:.1}", b as f64 / 1048576.0)),
                errors_field(&w.errors)
            );
        }
    }
    if !r.skipped.is_empty() {
        let _ = writeln!(s, "skipped: {}", r.skipped.join("; "));
    }
    let total = r.requests.len();
    let failed: u64 = r.errors.values().sum();
    let _ = writeln!(
        s,
        "requests: {total}, errors: {failed}{}",
        if r.errors.is_empty() {
            String::new()
        } else {
            format!(" ({})", errors_field(&r.errors))
        }
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(start: f64, e2e: f64, ok: bool, tokens: u64) -> RequestRecord {
        RequestRecord {
            group: "g".into(),
            prompt_id: "p,\"q\"".into(),
            start_s: start,
            ok,
            error: (!ok).then(|| "http_429".to_string()),
            error_detail: None,
            ttft_s: ok.then_some(0.1),
            e2e_s: e2e,
            output_tokens: tokens,
            prompt_tokens: Some(10),
            usage_reported: true,
            text_chunks: tokens,
            tpot_s: ok.then_some(0.02),
            decode_tok_s: ok.then_some(50.0),
            itl_s: vec![0.02; tokens.saturating_sub(1) as usize],
        }
    }

    #[test]
    fn group_aggregates_over_wall_time() {
        let recs = [
            rec(0.0, 2.0, true, 100),
            rec(1.0, 3.0, true, 100),
            rec(1.5, 0.1, false, 0),
        ];
        let g = GroupSummary::of("c=2", 2.0, Some(2), &recs);
        assert_eq!((g.requests, g.ok), (3, 2));
        assert_eq!(g.errors["http_429"], 1);
        assert!((g.wall_s - 4.0).abs() < 1e-12);
        assert!((g.aggregate_tok_s - 50.0).abs() < 1e-12);
        assert_eq!(g.per_stream_tok_s, Some(25.0));
        assert_eq!(g.itl_s.count, 198);
    }

    #[test]
    fn csv_quotes_fields() {
        let csv = requests_csv(&[rec(0.0, 1.0, true, 2)]);
        let line = csv.lines().nth(1).unwrap();
        assert!(line.starts_with("g,\"p,\"\"q\"\"\",0,true,"), "{line}");
        assert_eq!(
            csv.lines().next().unwrap().split(',').count(),
            line.split(',').count() - 1 // the quoted comma
        );
    }
}
