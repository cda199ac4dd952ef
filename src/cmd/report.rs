//! `katz report`: what a workload run did, read back from the jobs' Redis records.
//!
//! ```text
//! --config NAME=PREFIX (repeatable; NAME as SERIES@LOAD groups runs of one configuration at
//!                       several offered loads)
//!   SCAN katz:job:PREFIX-* ─▶ records (submitted_ms, started_ms, finished_ms, queue_wait_ms,
//!                              lora_loads, lora_cache_hits, lora_wait_ms, …)
//!   ─▶ per configuration: latency p50/p90/p99 (finished − submitted), queue wait, throughput
//!      (done ÷ span), offered load (jobs ÷ submission span), LoRA loads per request, cache hit
//!      rate, bound-K waits
//!   ─▶ OUT/report.md, OUT/report.json, OUT/latency-cdf.svg, OUT/throughput.svg
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use super::RedisArgs;

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// A configuration: NAME=PREFIX (the job ids PREFIX-0, PREFIX-1 … of `katz trace replay
    /// --id-prefix`); NAME as SERIES@LOAD puts it on the SERIES curve of the throughput plot.
    #[arg(long = "config", required = true)]
    pub configs: Vec<String>,
    /// Where report.md, report.json and the SVG plots go.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub redis: RedisArgs,
}

/// One configuration's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigReport {
    pub name: String,
    pub prefix: String,
    pub jobs: usize,
    pub done: usize,
    pub failed: usize,
    pub unfinished: usize,
    pub offered_per_s: f64,
    pub throughput_per_s: f64,
    pub latency_ms: Percentiles,
    pub queue_wait_ms: Percentiles,
    pub service_ms: Percentiles,
    pub lora_loads_per_request: f64,
    pub lora_cache_hit_rate: f64,
    pub lora_wait_ms: Percentiles,
    /// Sorted end-to-end latencies (ms) of the done jobs, for the CDF.
    #[serde(skip)]
    pub latencies: Vec<f64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Percentiles of `v` (nearest rank); all zero when empty.
pub fn percentiles(v: &mut [f64]) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Percentiles {
        n: v.len(),
        mean: v.iter().sum::<f64>() / v.len() as f64,
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: v[v.len() - 1],
    }
}

/// The figures of one configuration from its jobs' records.
pub fn summarize(name: &str, prefix: &str, records: &[HashMap<String, String>]) -> ConfigReport {
    let num = |r: &HashMap<String, String>, k: &str| r.get(k).and_then(|v| v.parse::<f64>().ok());
    let done: Vec<&HashMap<String, String>> = records
        .iter()
        .filter(|r| r.get("status").map(String::as_str) == Some("done"))
        .collect();
    let failed = records
        .iter()
        .filter(|r| {
            matches!(
                r.get("status").map(String::as_str),
                Some("failed") | Some("cancelled") | Some("expired")
            )
        })
        .count();
    let mut lat: Vec<f64> = done
        .iter()
        .filter_map(|r| Some(num(r, "finished_ms")? - num(r, "submitted_ms")?))
        .collect();
    let mut wait: Vec<f64> = done.iter().filter_map(|r| num(r, "queue_wait_ms")).collect();
    let mut service: Vec<f64> = done.iter().filter_map(|r| num(r, "service_ms")).collect();
    let mut lora_wait: Vec<f64> = done.iter().filter_map(|r| num(r, "lora_wait_ms")).collect();
    let loads: f64 = done.iter().filter_map(|r| num(r, "lora_loads")).sum();
    let hits: f64 = done.iter().filter_map(|r| num(r, "lora_cache_hits")).sum();
    let sub: Vec<f64> = records.iter().filter_map(|r| num(r, "submitted_ms")).collect();
    let fin: Vec<f64> = done.iter().filter_map(|r| num(r, "finished_ms")).collect();
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sub_span = (max(&sub) - min(&sub)) / 1e3;
    let run_span = (max(&fin) - min(&sub)) / 1e3;
    let latency_ms = percentiles(&mut lat);
    ConfigReport {
        name: name.to_string(),
        prefix: prefix.to_string(),
        jobs: records.len(),
        done: done.len(),
        failed,
        unfinished: records.len() - done.len() - failed,
        // n jobs over the span of their submissions: n − 1 gaps
        offered_per_s: if sub_span > 0.0 {
            (sub.len().saturating_sub(1)) as f64 / sub_span
        } else {
            0.0
        },
        throughput_per_s: if run_span > 0.0 {
            done.len() as f64 / run_span
        } else {
            0.0
        },
        latency_ms,
        queue_wait_ms: percentiles(&mut wait),
        service_ms: percentiles(&mut service),
        lora_loads_per_request: if done.is_empty() {
            0.0
        } else {
            loads / done.len() as f64
        },
        lora_cache_hit_rate: if hits + loads > 0.0 {
            hits / (hits + loads)
        } else {
            0.0
        },
        lora_wait_ms: percentiles(&mut lora_wait),
        latencies: lat,
    }
}

pub fn run(a: ReportArgs) -> anyhow::Result<()> {
    let mut pairs = Vec::new();
    for c in &a.configs {
        let Some((name, prefix)) = c.split_once('=') else {
            bail!("--config {c}: NAME=PREFIX");
        };
        if name.is_empty() || prefix.is_empty() {
            bail!("--config {c}: NAME=PREFIX, both non-empty");
        }
        pairs.push((name.to_string(), prefix.to_string()));
    }
    let reports = super::block_on(async {
        let mut redis = a.redis.connect().await?;
        let mut out = Vec::new();
        for (name, prefix) in &pairs {
            let records = read_records(&mut redis, prefix).await?;
            if records.is_empty() {
                bail!("no job records katz:job:{prefix}-* in Redis (expired, or another prefix?)");
            }
            out.push(summarize(name, prefix, &records));
        }
        anyhow::Ok(out)
    })?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let md = markdown(&reports);
    std::fs::write(a.out.join("report.md"), &md)?;
    std::fs::write(
        a.out.join("report.json"),
        serde_json::to_string_pretty(&reports)? + "\n",
    )?;
    std::fs::write(a.out.join("latency-cdf.svg"), cdf_svg(&reports))?;
    std::fs::write(a.out.join("throughput.svg"), throughput_svg(&reports))?;
    print!("{md}");
    println!(
        "wrote {}/report.md, report.json, latency-cdf.svg, throughput.svg",
        a.out.display()
    );
    Ok(())
}

async fn read_records(
    redis: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> anyhow::Result<Vec<HashMap<String, String>>> {
    let pattern = katz_actors::protocol::job_key(&format!("{prefix}-*"));
    let mut keys: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    // job keys only (katz:job:ID), not their image or cancel keys
    let want = katz_actors::protocol::job_key("");
    keys.retain(|k| k.strip_prefix(&want).is_some_and(|id| !id.contains(':')));
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let r: HashMap<String, String> = redis::AsyncCommands::hgetall(redis, &k).await?;
        out.push(r);
    }
    Ok(out)
}

/// The records of the jobs `ids` (an empty map for an id without one), in that order.
pub async fn read_ids(
    redis: &mut redis::aio::MultiplexedConnection,
    ids: &[String],
) -> anyhow::Result<Vec<HashMap<String, String>>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.hgetall(katz_actors::protocol::job_key(id));
        }
        let rs: Vec<HashMap<String, String>> = pipe.query_async(redis).await?;
        out.extend(rs);
    }
    Ok(out)
}

fn markdown(rs: &[ConfigReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| configuration | jobs | done | failed | offered /s | throughput /s | latency p50 | p90 | p99 | queue wait p50 | p90 | LoRA loads/req | LoRA hit rate | LoRA wait p90 |"
    );
    let _ = writeln!(s, "|{}", "---|".repeat(15));
    for r in rs {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.3} | {:.3} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.3} | {:.3} | {:.0} ms |",
            r.name,
            r.jobs,
            r.done,
            r.failed,
            r.offered_per_s,
            r.throughput_per_s,
            r.latency_ms.p50,
            r.latency_ms.p90,
            r.latency_ms.p99,
            r.queue_wait_ms.p50,
            r.queue_wait_ms.p90,
            r.lora_loads_per_request,
            r.lora_cache_hit_rate,
            r.lora_wait_ms.p90
        );
    }
    s
}

const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// A plain SVG line chart: series of (x, y) points, axes from 0 to the data's maxima.
/// `series`: (name, points, style) with style = (colour index, dash index).
type Series = (String, Vec<(f64, f64)>, (usize, usize));

const DASHES: [&str; 5] = ["", "8,4", "3,3", "10,3,2,3", "1,3"];

fn chart(title: &str, xlabel: &str, ylabel: &str, series: &[Series], markers: bool) -> String {
    let (w, h, l, b, t, r) = (640.0, 420.0, 70.0, 50.0, 30.0, 170.0);
    let xmax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.05;
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.05;
    let px = |x: f64| l + x / xmax * (w - l - r);
    let py = |y: f64| h - b - y / ymax * (h - b - t);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n",
        (w - r + l) / 2.0
    );
    let _ = writeln!(
        s,
        "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        h - b,
        w - r,
        h - b
    );
    let _ = writeln!(
        s,
        "<line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>",
        h - b
    );
    for k in 0..=4 {
        let (xv, yv) = (xmax / 1.05 * k as f64 / 4.0, ymax / 1.05 * k as f64 / 4.0);
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            px(xv),
            h - b + 16.0,
            fmt_num(xv)
        );
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            l - 6.0,
            py(yv) + 4.0,
            fmt_num(yv)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{xlabel}</text>",
        (w - r + l) / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        s,
        "<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">{ylabel}</text>",
        (h - b + t) / 2.0,
        (h - b + t) / 2.0
    );
    for (i, (name, pts, (ci, di))) in series.iter().enumerate() {
        let c = COLOURS[ci % COLOURS.len()];
        let dash = DASHES[di % DASHES.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\" points=\"{}\"/>",
            path.join(" ")
        );
        if markers {
            for &(x, y) in pts {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{c}\"/>",
                    px(x),
                    py(y)
                );
            }
        }
        let ly = t + 16.0 * i as f64 + 10.0;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"3\"/>",
            w - r + 10.0,
            w - r + 30.0
        );
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\">{}</text>",
            w - r + 35.0,
            ly + 4.0,
            xml(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Latency CDF, one curve per configuration: a colour per series (NAME = SERIES@LOAD), a dash
/// pattern per load within it.
fn cdf_svg(rs: &[ConfigReport]) -> String {
    let series_of = |r: &ConfigReport| r.name.split('@').next().unwrap_or(&r.name).to_string();
    let mut names: Vec<String> = rs.iter().map(series_of).collect();
    names.sort();
    names.dedup();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let series: Vec<Series> = rs
        .iter()
        .map(|r| {
            let sname = series_of(r);
            let ci = names.iter().position(|x| *x == sname).unwrap_or(0);
            let di = seen.entry(sname).or_default();
            let style = (ci, *di);
            *di += 1;
            let n = r.latencies.len().max(1) as f64;
            let pts = r
                .latencies
                .iter()
                .enumerate()
                .map(|(i, &v)| (v / 1e3, (i + 1) as f64 / n))
                .collect();
            (r.name.clone(), pts, style)
        })
        .collect();
    chart(
        "End-to-end latency (CDF)",
        "latency (s)",
        "fraction of jobs",
        &series,
        false,
    )
}

/// Throughput against offered load, one curve per series (NAME = SERIES@LOAD).
fn throughput_svg(rs: &[ConfigReport]) -> String {
    let mut by: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in rs {
        let series = r.name.split('@').next().unwrap_or(&r.name).to_string();
        by.entry(series)
            .or_default()
            .push((r.offered_per_s, r.throughput_per_s));
    }
    let series: Vec<Series> = by
        .into_iter()
        .enumerate()
        .map(|(i, (k, mut v))| {
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            (k, v, (i, 0))
        })
        .collect();
    chart(
        "Throughput vs offered load",
        "offered load (jobs/s)",
        "throughput (jobs/s)",
        &series,
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sub: u64, fin: u64, status: &str, loads: u32, hits: u32) -> HashMap<String, String> {
        let kv = [
            ("status", status.to_string()),
            ("submitted_ms", sub.to_string()),
            ("finished_ms", fin.to_string()),
            ("queue_wait_ms", (fin.saturating_sub(sub) / 2).to_string()),
            ("lora_loads", loads.to_string()),
            ("lora_cache_hits", hits.to_string()),
        ];
        kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = percentiles(&mut v);
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(percentiles(&mut []).n, 0);
    }

    #[test]
    fn a_configuration_sums_up_its_records_and_plots() {
        let rs = vec![
            rec(0, 1000, "done", 1, 0),
            rec(500, 2500, "done", 0, 2),
            rec(1000, 2000, "done", 1, 1),
            rec(1500, 0, "failed", 0, 0),
        ];
        let r = summarize("async@1", "p", &rs);
        assert_eq!((r.jobs, r.done, r.failed, r.unfinished), (4, 3, 1, 0));
        assert_eq!(r.latency_ms.p50, 1000.0);
        assert_eq!(r.latency_ms.max, 2000.0);
        assert!((r.offered_per_s - 2.0).abs() < 1e-9, "{}", r.offered_per_s); // 3 gaps in 1.5 s
        assert!((r.throughput_per_s - 1.2).abs() < 1e-9, "{}", r.throughput_per_s); // 3 in 2.5 s
        assert!((r.lora_loads_per_request - 2.0 / 3.0).abs() < 1e-9);
        assert!((r.lora_cache_hit_rate - 0.6).abs() < 1e-9);
        let svg = throughput_svg(std::slice::from_ref(&r));
        assert!(svg.starts_with("<svg") && svg.contains("async") && svg.contains("<circle"));
        assert!(cdf_svg(&[r]).contains("<polyline"));
    }
}
