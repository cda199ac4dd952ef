//! What an operator sees of the workers (docs/operations.md), on `katz` processes against the real
//! RabbitMQ and Redis on localhost (`tools/services.sh`): no password of a broker URL in any
//! output; JSON log lines with `KATZ_LOG_FORMAT=json` and no ANSI escapes when stderr is a file;
//! the ControlNet worker's `/healthz`, `/readyz` and `/metrics`, from loading to sessions served.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;

const WRONG: &str = "WRONGPASS-7f3a";
const BAD_AMQP: &str = "amqp://guest:WRONGPASS-7f3a@127.0.0.1:5672/%2f";

fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

/// A free port on 127.0.0.1 (bound, then released).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// `GET path` on `addr`: (status code, body); None while nothing answers.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what}: not within {within:?}");
}

/// `katz ARGS` with `env`, stdout and stderr to a log file; killed when dropped.
struct Proc {
    child: Child,
    log: std::path::PathBuf,
}

impl Proc {
    fn spawn(name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let log = std::env::temp_dir().join(format!("katz-ops-{}-{name}.log", std::process::id()));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(katz_bin())
            .args(args)
            .env_remove("KATZ_LOG_FORMAT")
            .envs(env.iter().copied())
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("katz starts");
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `katz ARGS` with `env` (text logs), which must fail: its stderr.
fn katz_fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(katz_bin())
        .args(args)
        .env_remove("KATZ_LOG_FORMAT")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!out.status.success(), "katz {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Text a person or a log shipper reads: no password, no ANSI escape.
fn assert_clean(what: &str, out: &str) {
    assert!(!out.contains(WRONG), "{what} prints the password:\n{out}");
    assert!(!out.contains('\u{1b}'), "{what} has ANSI escapes:\n{out}");
}

#[test]
fn a_wrong_amqp_password_is_never_printed_and_json_logs_are_one_object_a_line() {
    let _g = serial();
    let queue = format!("katz.test.ops-login.{}", std::process::id());
    let w = Proc::spawn(
        "badlogin",
        &[
            "worker",
            "--amqp",
            BAD_AMQP,
            "--queue",
            &queue,
            "--name",
            "ops-badlogin",
            "--threads",
            "1",
        ],
        &[("KATZ_LOG_FORMAT", "json"), ("KATZ_LOG", "info,ort=warn")],
    );
    wait_for("two failed logins logged", Duration::from_secs(120), || {
        w.log().matches("cannot reach RabbitMQ").count() >= 2
    });
    let log = w.log();
    assert_clean("katz worker", &log);
    let mut refused = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
        if v["fields"]["message"] == "cannot reach RabbitMQ" {
            let error = v["fields"]["error"].as_str().unwrap_or_default();
            assert!(
                error.contains("ACCESS_REFUSED") || error.contains("refused"),
                "{line}"
            );
            refused += 1;
        }
    }
    assert!(refused >= 2, "{log}");
    println!(
        "{} JSON lines, {refused} refused logins, no password",
        log.lines().count()
    );
}

#[test]
fn a_password_in_a_redis_or_amqp_url_is_masked_in_command_errors() {
    let _g = serial();
    // Redis without a password refuses AUTH: the error names the URL, masked
    let url = format!("redis://:{WRONG}@127.0.0.1:6379/");
    let err = katz_fails(&["status", "no-such-job", "--redis", &url], &[]);
    assert_clean("katz status", &err);
    assert!(err.contains("redis://:***@127.0.0.1:6379/"), "{err}");
    // a refused AMQP login in a one-shot command
    let err = katz_fails(&["submit", "--prompt", "x", "--amqp", BAD_AMQP], &[]);
    assert_clean("katz submit", &err);
    assert!(err.contains("amqp://guest:***@127.0.0.1:5672/%2f"), "{err}");
    // an unknown log format stops the command at start
    let err = katz_fails(&["status", "x"], &[("KATZ_LOG_FORMAT", "xml")]);
    assert!(err.contains("KATZ_LOG_FORMAT"));
}

#[test]
fn the_controlnet_worker_answers_probes_and_metrics_from_loading_to_sessions_served() {
    let _g = serial();
    rt().block_on(async {
        let bus = Bus::new("ops-cn").await;
        let cn_queue = format!("{}.cn", bus.queue);
        let cn_addr = free_addr();
        let model = "tiny-sdxl-controlnet";

        // a wrong password: alive, not ready, and the password nowhere in its text logs
        let bad = Proc::spawn(
            "cn-badlogin",
            &[
                "controlnet-worker",
                "--bundle",
                "bundles/tiny-sdxl-controlnet",
                "--amqp",
                BAD_AMQP,
                "--queue",
                &cn_queue,
                "--threads",
                "1",
                "--metrics-addr",
                &cn_addr.to_string(),
            ],
            &[("KATZ_LOG", "info,ort=warn")],
        );
        wait_for(
            "/healthz of the ControlNet worker",
            Duration::from_secs(60),
            || get(cn_addr, "/healthz").is_some_and(|(c, _)| c == 200),
        );
        wait_for("a refused login logged", Duration::from_secs(60), || {
            bad.log().contains("cannot reach RabbitMQ")
        });
        let (code, body) = get(cn_addr, "/readyz").unwrap();
        assert_eq!(
            (code, body.trim()),
            (503, "loading"),
            "not ready without RabbitMQ"
        );
        assert_clean("katz controlnet-worker", &bad.log());
        drop(bad);

        // the real broker: ready, and its metrics count the sessions of a job
        let cn = Proc::spawn(
            "cn",
            &[
                "controlnet-worker",
                "--bundle",
                "bundles/tiny-sdxl-controlnet",
                "--queue",
                &cn_queue,
                "--threads",
                "1",
                "--metrics-addr",
                &cn_addr.to_string(),
                "--name",
                "ops-cn",
            ],
            &[("KATZ_LOG", "info,ort=warn")],
        );
        wait_for("/readyz 200", Duration::from_secs(60), || {
            get(cn_addr, "/readyz").is_some_and(|(c, b)| c == 200 && b.trim() == "ready")
        });
        let (_, m) = get(cn_addr, "/metrics").unwrap();
        for want in [
            format!("katz_controlnet_sessions_total{{model=\"{model}\",end=\"closed\"}} 0"),
            format!("katz_controlnet_errors_total{{model=\"{model}\",error_kind=\"redis\"}} 0"),
            format!("katz_controlnet_steps_total{{model=\"{model}\"}} 0"),
            "katz_build_info{version=\"0.1.0\"".to_string(),
        ] {
            assert!(m.contains(&want), "no `{want}` in\n{m}");
        }
        let base_addr = free_addr();
        let service = format!("{model}@{cn_queue}");
        let base = Proc::spawn(
            "base",
            &[
                "worker",
                "--queue",
                &bus.queue,
                "--name",
                "ops-base",
                "--threads",
                "1",
                "--controlnet-service",
                &service,
                "--metrics-addr",
                &base_addr.to_string(),
            ],
            &[("KATZ_LOG", "info,ort=warn")],
        );
        let mut bus = bus;
        let mut j = job("ops-cn");
        with_controlnets(&mut j, 1);
        j.steps = 3;
        bus.publish(&j).await;
        let r = bus.wait_final(&j.id, Duration::from_secs(120)).await;
        assert_eq!(r["status"], "done", "{r:?}\n{}", base.log());
        // the session ends when the base closes it, just after the job
        let mut m = String::new();
        wait_for("a closed session counted", Duration::from_secs(20), || {
            m = get(cn_addr, "/metrics").map(|(_, b)| b).unwrap_or_default();
            m.contains(&format!(
                "katz_controlnet_sessions_total{{model=\"{model}\",end=\"closed\"}} 1"
            ))
        });
        for want in [
            format!("katz_controlnet_steps_total{{model=\"{model}\"}} 3"),
            format!("katz_controlnet_step_seconds_count{{model=\"{model}\"}} 3"),
            format!("katz_controlnet_sessions_active{{model=\"{model}\"}} 0"),
        ] {
            assert!(m.contains(&want), "no `{want}` in\n{m}");
        }
        // queue depth and the consumer, within a poll period
        wait_for("the ControlNet queue's gauges", Duration::from_secs(15), || {
            let m = get(cn_addr, "/metrics").map(|(_, b)| b).unwrap_or_default();
            m.contains(&format!("katz_queue_messages{{queue=\"{cn_queue}\"}} 0"))
                && m.contains(&format!("katz_queue_consumers{{queue=\"{cn_queue}\"}} 1"))
        });
        // the base worker: the job by model and outcome, every other outcome and kind at 0
        wait_for("the base worker's queue gauges", Duration::from_secs(15), || {
            let m = get(base_addr, "/metrics").map(|(_, b)| b).unwrap_or_default();
            m.contains(&format!("katz_queue_messages{{queue=\"{}\"}} 0", bus.queue))
                && m.contains(&format!("katz_queue_consumers{{queue=\"{cn_queue}\"}} 1"))
        });
        let (_, bm) = get(base_addr, "/metrics").unwrap();
        for want in [
            "katz_jobs_total{model=\"tiny-sdxl\",outcome=\"done\"} 1",
            "katz_jobs_total{model=\"tiny-sdxl\",outcome=\"failed\"} 0",
            "katz_jobs_total{model=\"tiny-sdxl\",outcome=\"requeued\"} 0",
            "katz_job_errors_total{model=\"tiny-sdxl\",error_kind=\"controlnet\"} 0",
            "katz_job_errors_total{model=\"tiny-sdxl\",error_kind=\"decode\"} 0",
            "# TYPE katz_build_info gauge",
        ] {
            assert!(bm.contains(want), "no `{want}` in\n{bm}");
        }
        // a message that is not a job: rejected, counted by model and kind
        bus.publish_raw(b"not msgpack").await;
        wait_for("a rejected message counted", Duration::from_secs(20), || {
            let m = get(base_addr, "/metrics").map(|(_, b)| b).unwrap_or_default();
            m.contains("katz_jobs_total{model=\"tiny-sdxl\",outcome=\"rejected\"} 1")
                && m.contains("katz_job_errors_total{model=\"tiny-sdxl\",error_kind=\"decode\"} 1")
        });
        // SIGTERM: the ControlNet worker stops
        unsafe { libc::kill(cn.child.id() as i32, libc::SIGTERM) };
        let mut cn = cn;
        wait_for(
            "the ControlNet worker exits on SIGTERM",
            Duration::from_secs(30),
            || matches!(cn.child.try_wait(), Ok(Some(_))),
        );
        assert_clean("katz controlnet-worker", &cn.log());
        drop(base);
        bus.cleanup().await;
    });
}

/// The OpenTelemetry collector of the test venv (rotel, from PyPI: tools/requirements-test.txt).
fn collector_bin() -> std::path::PathBuf {
    let lib = root().join(".katz/py/lib");
    let found = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("site-packages/rotel/rotel-agent"))
        .find(|p| p.exists());
    found.unwrap_or_else(|| panic!("no rotel-agent under {}: run `make pyenv`", lib.display()))
}

/// One span of the collector's detailed debug log.
#[derive(Debug, Default, Clone)]
struct Exported {
    service: String,
    trace: String,
    parent: String,
    id: String,
    name: String,
    status: String,
    attrs: Vec<(String, String)>,
}

impl Exported {
    fn attr(&self, k: &str) -> Option<&str> {
        self.attrs.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
    }
}

/// The spans in rotel's `--debug-log traces --debug-log-verbosity detailed` output.
fn exported_spans(log: &str) -> Vec<Exported> {
    let mut out: Vec<Exported> = vec![];
    let (mut service, mut in_resource, mut in_span) = (String::new(), false, false);
    for line in log.lines() {
        let t = line.trim();
        let field = |k: &str| {
            t.strip_prefix(k)
                .map(|r| r.trim_start().trim_start_matches(':').trim().to_string())
        };
        if t.starts_with("ResourceSpans #") {
            (in_resource, in_span) = (true, false);
        } else if t.starts_with("ScopeSpans #") {
            in_resource = false;
        } else if t.starts_with("Events:") || t.starts_with("Links:") {
            in_span = false; // the span's own fields end where its events and links start
        } else if t.starts_with("Span #") {
            in_span = true;
            out.push(Exported {
                service: service.clone(),
                ..Default::default()
            });
        } else if let Some(kv) = t.strip_prefix("-> ") {
            let Some((k, v)) = kv.split_once(": ") else {
                continue;
            };
            let v = v.trim();
            let v = v
                .strip_prefix("Str(")
                .or_else(|| v.strip_prefix("Int("))
                .and_then(|v| v.strip_suffix(')'))
                .unwrap_or(v);
            if in_resource && k == "service.name" {
                service = v.to_string();
            } else if in_span {
                if let Some(s) = out.last_mut() {
                    s.attrs.push((k.to_string(), v.to_string()));
                }
            }
        } else if let (true, Some(s)) = (in_span, out.last_mut()) {
            if let Some(v) = field("Trace ID") {
                s.trace = v;
            } else if let Some(v) = field("Parent ID") {
                s.parent = v;
            } else if let Some(v) = field("ID") {
                s.id = v;
            } else if let Some(v) = field("Name") {
                s.name = v;
            } else if let Some(v) = field("Status code") {
                s.status = v;
            }
        }
    }
    out
}

#[test]
fn job_and_step_spans_reach_an_opentelemetry_collector() {
    let _g = serial();
    // a protocol katz cannot speak is refused at start, naming the variable
    let err = katz_fails(
        &["status", "nothing"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
    );
    assert!(
        err.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && err.contains("http/protobuf"),
        "{err}"
    );

    // a real collector (OTLP/HTTP and gRPC receivers), printing every span it receives
    let http = free_addr();
    let grpc = free_addr();
    let log = std::env::temp_dir().join(format!("katz-ops-{}-collector.log", std::process::id()));
    let mut collector = Command::new(collector_bin())
        .args(["start", "--otlp-http-endpoint", &http.to_string()])
        .args(["--otlp-grpc-endpoint", &grpc.to_string()])
        .args(["--exporter", "blackhole", "--debug-log", "traces"])
        .args(["--debug-log-verbosity", "detailed"])
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("the collector starts");
    wait_for("the collector's OTLP/HTTP port", Duration::from_secs(30), || {
        TcpStream::connect_timeout(&http, Duration::from_secs(1)).is_ok()
    });
    let read = || std::fs::read_to_string(&log).unwrap_or_default();

    rt().block_on(async {
        let mut bus = Bus::new("ops-otlp").await;
        let endpoint = format!("http://{http}");
        let otel = [
            ("KATZ_LOG", "info,ort=warn"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ];
        // the ControlNet as a service of its own: its session joins the job's trace
        let cn_queue = format!("{}.cn", bus.queue);
        let cn = Proc::spawn(
            "otlp-cn",
            &[
                "controlnet-worker",
                "--bundle",
                "bundles/tiny-sdxl-controlnet",
                "--queue",
                &cn_queue,
                "--threads",
                "1",
            ],
            &otel,
        );
        let service = format!("tiny-sdxl-controlnet@{cn_queue}");
        let w = Proc::spawn(
            "otlp-worker",
            &[
                "worker",
                "--queue",
                &bus.queue,
                "--name",
                "ops-otlp",
                "--threads",
                "1",
                "--controlnet-service",
                &service,
            ],
            &otel,
        );
        let mut j = job("ops-otlp");
        with_controlnets(&mut j, 1);
        j.steps = 3;
        bus.publish(&j).await;
        let r = bus.wait_final(&j.id, Duration::from_secs(120)).await;
        assert_eq!(r["status"], "done", "{r:?}\n{}\n{}", w.log(), cn.log());
        assert!(w.log().contains("exporting traces over OTLP/HTTP"), "{}", w.log());

        let mut spans = vec![];
        wait_for(
            "the job's and its session's spans at the collector",
            Duration::from_secs(30),
            || {
                spans = exported_spans(&read());
                let job = spans
                    .iter()
                    .find(|s| s.name == "job" && s.attr("id") == Some(&j.id));
                job.is_some_and(|job| {
                    spans
                        .iter()
                        .filter(|s| s.name == "step" && s.parent == job.id)
                        .count()
                        == 3
                        && spans
                            .iter()
                            .any(|s| s.name == "session" && s.attr("job") == Some(&j.id))
                })
            },
        );
        let job = spans
            .iter()
            .find(|s| s.name == "job" && s.attr("id") == Some(&j.id))
            .unwrap();
        assert_eq!(job.service, "katz-worker", "{job:?}");
        assert_eq!(job.attr("outcome"), Some("done"), "{job:?}");
        assert_eq!(job.attr("steps"), Some("3"), "{job:?}");
        assert_eq!(job.attr("controlnets"), Some("1"), "{job:?}");
        assert_eq!(job.parent, "", "a job is a trace's root: {job:?}");
        let steps: Vec<&Exported> = spans
            .iter()
            .filter(|s| s.parent == job.id && s.name == "step")
            .collect();
        assert!(steps.iter().all(|s| s.trace == job.trace), "{steps:?}");
        let mut i: Vec<&str> = steps.iter().filter_map(|s| s.attr("i")).collect();
        i.sort();
        assert_eq!(i, ["0", "1", "2"], "{steps:?}");
        // the session, exported by the other process, is in the job's trace, under one of its spans
        let session = spans
            .iter()
            .find(|s| s.name == "session" && s.attr("job") == Some(&j.id))
            .unwrap();
        assert_eq!(session.service, "katz-controlnet-worker", "{session:?}");
        assert_eq!(
            session.trace, job.trace,
            "the session is not in the job's trace: {session:?}"
        );
        let in_trace: Vec<&str> = spans
            .iter()
            .filter(|s| s.trace == job.trace)
            .map(|s| s.id.as_str())
            .collect();
        assert!(
            !session.parent.is_empty() && in_trace.contains(&session.parent.as_str()),
            "the session's parent is not a span of the job: {session:?}"
        );
        drop(w);
        drop(cn);
    });
    let _ = collector.kill();
    let _ = collector.wait();
}
