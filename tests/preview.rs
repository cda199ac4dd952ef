//! Step previews against the real RabbitMQ and Redis (`tools/services.sh` starts them): a
//! `katz worker --preview-every 5` process on the trained family (`bundles/shapes`, its fitted
//! `preview_rgb`) runs a 20-step job; its events carry `preview_step` 5, 10 and 15 (none after
//! the last step), `katz:job:<id>:preview` holds a PNG of latent size (16×16 for 128²) with the
//! job's TTL, and the last preview looks like the final image.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use katz_actors::protocol::{events_channel, image_key, preview_key, Event, Job, Seed};
use katz_onnx::image::decode_png;
use katz_onnx::tensor::Tensor;
use redis::AsyncCommands;

/// `[1,3,H,W]` averaged over `f×f` blocks.
fn block_mean(t: &Tensor, f: usize) -> Vec<f64> {
    let (h, w) = (t.shape[2], t.shape[3]);
    let (bh, bw) = (h / f, w / f);
    let mut out = vec![0.0; 3 * bh * bw];
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                out[c * bh * bw + (y / f) * bw + x / f] +=
                    t.data[c * h * w + y * w + x] as f64 / (f * f) as f64;
            }
        }
    }
    out
}

fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// Mean of each colour channel of a `[1,3,h,w]` layout flattened as `block_mean` gives it.
fn channel_means(v: &[f64]) -> [f64; 3] {
    let n = v.len() / 3;
    [0, 1, 2].map(|c| v[c * n..(c + 1) * n].iter().sum::<f64>() / n as f64)
}

#[test]
fn a_worker_publishes_previews_every_n_steps_that_look_like_the_final_image() {
    rt().block_on(async {
        let mut bus = Bus::new("preview").await;
        let name = format!("w-preview-{}", std::process::id());
        let w = Worker::start(
            &bus.queue,
            &name,
            &[
                "--bundle",
                "bundles/shapes/shapes-sdxl",
                "--controlnet",
                "none",
                "--preview-every",
                "5",
            ],
        );
        let mut j = Job::new(
            uid("preview"),
            "shapes-sdxl",
            "a red circle above a blue square on a white background",
        );
        (j.width, j.height, j.steps, j.seed) = (128, 128, 20, Seed::Fixed(1));
        j.result_ttl_s = 600;
        let client = redis::Client::open(REDIS).unwrap();
        let mut sub = client.get_async_pubsub().await.unwrap();
        sub.subscribe(events_channel(&j.id)).await.unwrap();
        bus.publish(&j).await;

        // every event until the job's end; the preview key read as each preview event arrives
        let mut previews: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        let mut steps_seen = Vec::new();
        {
            let mut msgs = sub.on_message();
            loop {
                let m = tokio::time::timeout(Duration::from_secs(240), msgs.next())
                    .await
                    .unwrap_or_else(|_| panic!("no event within 240 s; worker log:\n{}", w.log()))
                    .expect("the subscription stays open");
                let e: Event = serde_json::from_str(&m.get_payload::<String>().unwrap()).unwrap();
                if let Some(k) = e.preview_step {
                    assert_eq!(e.step, k, "a preview event is its step's progress: {e:?}");
                    let png: Vec<u8> = bus.redis.get(preview_key(&j.id)).await.unwrap();
                    previews.insert(k, png);
                }
                if e.status.is_final() {
                    assert_eq!(e.status.as_str(), "done", "{e:?}\n{}", w.log());
                    break;
                }
                steps_seen.push(e.step);
            }
        }
        assert_eq!(
            previews.keys().copied().collect::<Vec<_>>(),
            vec![5, 10, 15],
            "previews after steps 5, 10, 15, not after the last (steps seen: {steps_seen:?})"
        );
        let r = bus.record(&j.id).await;
        assert_eq!(r["status"], "done", "{r:?}");
        assert_eq!(r["preview_step"], "15", "{r:?}");
        let ttl: i64 = bus.redis.ttl(preview_key(&j.id)).await.unwrap();
        assert!(
            ttl > 0 && ttl <= 600,
            "the preview expires with the job's TTL: {ttl}"
        );

        // each preview decodes to latent size; the key holds the last one at the end
        for (k, png) in &previews {
            let t = decode_png(png, Path::new("preview.png")).unwrap_or_else(|e| panic!("step {k}: {e}"));
            assert_eq!(t.shape, vec![1, 3, 16, 16], "step {k}");
        }
        let stored: Vec<u8> = bus.redis.get(preview_key(&j.id)).await.unwrap();
        assert_eq!(&stored, &previews[&15]);

        // the last preview looks like the final image at latent resolution: the same layout
        // (correlation over every pixel and channel) and about the same colour
        let last = decode_png(&previews[&15], Path::new("preview.png")).unwrap();
        let image: Vec<u8> = bus.redis.get(image_key(&j.id)).await.unwrap();
        let fin = decode_png(&image, Path::new("image.png")).unwrap();
        assert_eq!(fin.shape, vec![1, 3, 128, 128]);
        let (p, f) = (block_mean(&last, 1), block_mean(&fin, 8));
        let corr = correlation(&p, &f);
        let (mp, mf) = (channel_means(&p), channel_means(&f));
        let colour = (0..3).map(|c| (mp[c] - mf[c]).abs()).fold(0.0, f64::max);
        eprintln!("last preview vs final image: correlation {corr:.3}, mean colour {mp:.3?} vs {mf:.3?}");
        // measured: correlation 0.825; mean colour 0.77 vs 0.91 (the step's remaining noise
        // clipped at white darkens the preview's white background)
        assert!(corr > 0.6, "correlation {corr:.3}");
        assert!(colour < 0.2, "mean colour {mp:?} vs {mf:?}");
        // an earlier preview looks less like it than the last one
        let first = decode_png(&previews[&5], Path::new("preview.png")).unwrap();
        let corr5 = correlation(&block_mean(&first, 1), &f);
        eprintln!("preview at step 5 vs final image: correlation {corr5:.3}");
        assert!(corr5 < corr, "step 5 {corr5:.3} vs step 15 {corr:.3}");
        drop(w);
        bus.cleanup().await;
    });
}
