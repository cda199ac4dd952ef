//! The operator page at `/`: one server-rendered HTML page, no script.
//!
//! ```text
//! heartbeats katz:worker:* ─▶ live workers (base, queue, device, ControlNets, LoRAs)
//!   their queues (and dead-letter queues) ─passive declare─▶ messages ready
//! katz:gateway:recent (ZSET, the last jobs submitted through any gateway) ─▶ records, previews
//!   (katz:job:<id>:preview, else the image of a done job, inline as data: URIs)
//! ```

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;

use base64::Engine;
use redis::AsyncCommands;

use katz_actors::protocol::{image_key, job_key, now_ms};

use crate::models::{self, Catalog};
use crate::State;
use katz_actors::protocol::preview_key;

/// The jobs submitted last, newest highest.
pub const RECENT: &str = "katz:gateway:recent";
/// How many recent jobs are kept and shown.
pub const RECENT_KEEP: isize = 20;

/// `<`, `>`, `&`, `"`, `'` escaped for HTML text and attributes.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

pub async fn render(st: &State) -> Result<String, crate::error::ApiError> {
    let mut r = st.redis();
    let workers = models::workers(&mut r).await?;
    let catalog = Catalog::from_workers(workers);
    let live = catalog.live_workers();
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>katz gateway</title>\
         <style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;margin-bottom:1.5em}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}img{{width:64px;height:64px;image-rendering:pixelated}}</style>\
         </head><body><h1>katz gateway <small>{}</small></h1>",
        esc(&st.name)
    );
    // queue depths
    let queues: BTreeSet<String> = live.iter().map(|w| w.queue.clone()).collect();
    h.push_str(
        "<h2>Queues</h2><table id=\"queues\"><tr><th>queue</th><th>ready</th><th>dead letters</th></tr>",
    );
    for q in &queues {
        let depth = st.broker.depth(q).await;
        let dead = st.broker.depth(&katz_actors::topology::dead_queue(q)).await;
        let n = |d: Option<u32>| d.map(|d| d.to_string()).unwrap_or_else(|| "?".into());
        let _ = write!(
            h,
            "<tr data-queue=\"{q}\"><td>{q}</td><td class=\"depth\">{}</td><td class=\"dead\">{}</td></tr>",
            n(depth),
            n(dead),
            q = esc(q)
        );
    }
    h.push_str("</table>");
    // workers
    let now = now_ms();
    h.push_str(
        "<h2>Live workers</h2><table id=\"workers\"><tr><th>worker</th><th>base</th><th>queue</th><th>device</th>\
         <th>concurrency</th><th>ControlNets</th><th>LoRAs</th><th>heartbeat</th></tr>",
    );
    for w in live {
        let _ = write!(
            h,
            "<tr data-worker=\"{n}\"><td>{n}</td><td class=\"base\">{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"controlnets\">{}</td><td class=\"loras\">{}</td><td>{:.1} s ago</td></tr>",
            esc(&w.base),
            esc(&w.queue),
            esc(&w.device),
            w.concurrency,
            esc(&w.controlnets.join(", ")),
            esc(&w.loras.join(", ")),
            now.saturating_sub(w.heartbeat_ms) as f64 / 1e3,
            n = esc(&w.name)
        );
    }
    h.push_str("</table>");
    // recent jobs
    let ids: Vec<String> = r.zrevrange(RECENT, 0, RECENT_KEEP - 1).await?;
    h.push_str(
        "<h2>Recent jobs</h2><table id=\"jobs\"><tr><th>job</th><th>state</th><th>progress</th><th>base</th>\
         <th>preview</th><th>error</th></tr>",
    );
    for id in ids {
        let rec: HashMap<String, String> = r.hgetall(job_key(&id)).await?;
        if rec.is_empty() {
            continue;
        }
        let f = |k: &str| rec.get(k).cloned().unwrap_or_default();
        let status = f("status");
        let mut png: Option<Vec<u8>> = r.get(preview_key(&id)).await?;
        if png.is_none() && status == "done" {
            png = r.get(image_key(&id)).await?;
        }
        let img = png
            .map(|b| {
                format!(
                    "<img alt=\"preview of {}\" src=\"data:image/png;base64,{}\">",
                    esc(&id),
                    base64::engine::general_purpose::STANDARD.encode(b)
                )
            })
            .unwrap_or_default();
        let _ = write!(
            h,
            "<tr data-job=\"{i}\"><td>{i}</td><td class=\"status\">{}</td><td class=\"progress\">{}/{}</td>\
             <td>{}</td><td class=\"preview\">{img}</td><td>{}</td></tr>",
            esc(&status),
            esc(&f("step")),
            esc(&f("total")),
            esc(&f("base")),
            esc(&f("error")),
            i = esc(&id)
        );
    }
    h.push_str("</table></body></html>");
    Ok(h)
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_is_escaped() {
        assert_eq!(
            super::esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }
}
