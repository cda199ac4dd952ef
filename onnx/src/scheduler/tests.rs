use super::*;

#[derive(serde::Deserialize)]
struct Reference {
    sample: Vec<f32>,
    model_outputs: Vec<Vec<f32>>,
    noise: Vec<Vec<f32>>,
    cases: Vec<Case>,
    schedule_tables: Vec<Table>,
}

/// Timesteps of one setting, recorded without stepping.
#[derive(serde::Deserialize)]
struct Table {
    scheduler: String,
    steps: usize,
    timestep_spacing: String,
    use_karras_sigmas: bool,
    timesteps: Vec<f32>,
    init_noise_sigma: f32,
    /// Only for the Euler kinds.
    input_scales: Option<Vec<f32>>,
}

#[derive(serde::Deserialize)]
struct Case {
    scheduler: String,
    steps: usize,
    timestep_spacing: String,
    use_karras_sigmas: bool,
    prediction_type: String,
    beta_schedule: String,
    timesteps: Vec<f32>,
    init_noise_sigma: f32,
    input_scales: Vec<f32>,
    samples: Vec<Vec<f32>>,
}

impl Case {
    fn label(&self) -> String {
        format!(
            "{} steps={} spacing={} karras={} prediction={} betas={}",
            self.scheduler,
            self.steps,
            self.timestep_spacing,
            self.use_karras_sigmas,
            self.prediction_type,
            self.beta_schedule
        )
    }
}

/// Hands out the recorded noise rows in order.
struct Recorded<'a> {
    rows: &'a [Vec<f32>],
    next: usize,
}

impl NoiseSource for Recorded<'_> {
    fn fill(&mut self, out: &mut [f32]) {
        out.copy_from_slice(&self.rows[self.next]);
        self.next += 1;
    }
}

const REL_TOL: f32 = 1e-5;

/// Relative error of `got` against `want`, with values below 1 in magnitude measured against 1
/// (the data are of unit scale, so near-zero values that result from cancellation are not
/// judged by their own tiny magnitude).
fn rel_err(got: f32, want: f32) -> f32 {
    (got - want).abs() / want.abs().max(1.0)
}

fn reference() -> Reference {
    serde_json::from_str(include_str!("testdata/reference.json")).expect("reference.json parses")
}

#[test]
fn matches_diffusers_reference() {
    let reference = reference();
    assert!(reference.cases.len() >= 30);
    let mut worst = 0.0f32;
    for case in &reference.cases {
        let label = case.label();
        let config = SchedulerConfig {
            timestep_spacing: case.timestep_spacing.clone(),
            prediction_type: case.prediction_type.clone(),
            use_karras_sigmas: case.use_karras_sigmas,
            beta_schedule: case.beta_schedule.clone(),
            ..SchedulerConfig::default()
        };
        let kind: SchedulerKind = case.scheduler.parse().expect("known scheduler name");
        let mut scheduler = build(kind, &config, case.steps).expect("scheduler builds");
        assert_eq!(scheduler.kind(), kind);

        assert_eq!(
            scheduler.timesteps().len(),
            case.timesteps.len(),
            "{label}: timestep count"
        );
        for (i, (&got, &want)) in scheduler.timesteps().iter().zip(&case.timesteps).enumerate() {
            assert!(
                (got - want).abs() <= 1e-4,
                "{label}: timestep {i}: {got} vs {want}"
            );
        }
        let e = rel_err(scheduler.init_noise_sigma(), case.init_noise_sigma);
        assert!(
            e <= REL_TOL,
            "{label}: init_noise_sigma {} vs {}",
            scheduler.init_noise_sigma(),
            case.init_noise_sigma
        );
        worst = worst.max(e);

        let mut sample = reference.sample.clone();
        let mut noise = Recorded {
            rows: &reference.noise,
            next: 0,
        };
        for i in 0..case.timesteps.len() {
            let scale = scheduler.input_scale(i);
            let e = rel_err(scale, case.input_scales[i]);
            assert!(
                e <= REL_TOL,
                "{label}: input scale {i}: {scale} vs {}",
                case.input_scales[i]
            );
            worst = worst.max(e);

            scheduler.step(i, &reference.model_outputs[i], &mut sample, &mut noise);
            for (j, (&got, &want)) in sample.iter().zip(&case.samples[i]).enumerate() {
                let e = rel_err(got, want);
                assert!(
                    e <= REL_TOL,
                    "{label}: sample after step {i}, value {j}: {got} vs {want}"
                );
                worst = worst.max(e);
            }
        }
    }
    eprintln!("largest relative error against diffusers: {worst:e}");
}

#[test]
fn schedules_match_diffusers_reference() {
    let reference = reference();
    assert!(reference.schedule_tables.len() >= 300);
    for table in &reference.schedule_tables {
        let label = format!(
            "{} steps={} spacing={} karras={}",
            table.scheduler, table.steps, table.timestep_spacing, table.use_karras_sigmas
        );
        let config = SchedulerConfig {
            timestep_spacing: table.timestep_spacing.clone(),
            use_karras_sigmas: table.use_karras_sigmas,
            ..SchedulerConfig::default()
        };
        let kind: SchedulerKind = table.scheduler.parse().expect("known scheduler name");
        let scheduler = build(kind, &config, table.steps).expect("scheduler builds");
        assert_eq!(
            scheduler.timesteps().len(),
            table.timesteps.len(),
            "{label}: timestep count"
        );
        for (i, (&got, &want)) in scheduler.timesteps().iter().zip(&table.timesteps).enumerate() {
            assert!(
                (got - want).abs() <= 1e-4,
                "{label}: timestep {i}: {got} vs {want}"
            );
        }
        let (got, want) = (scheduler.init_noise_sigma(), table.init_noise_sigma);
        assert!(
            rel_err(got, want) <= REL_TOL,
            "{label}: init_noise_sigma {got} vs {want}"
        );
        let ones = vec![1.0; table.timesteps.len()];
        for (i, &want) in table.input_scales.as_ref().unwrap_or(&ones).iter().enumerate() {
            let got = scheduler.input_scale(i);
            assert!(
                rel_err(got, want) <= REL_TOL,
                "{label}: input scale {i}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn zero_steps_is_an_error() {
    for kind in SchedulerKind::ALL {
        let err = build(kind, &SchedulerConfig::default(), 0)
            .err()
            .expect("zero steps fails");
        assert!(matches!(err, SchedulerError::ZeroSteps), "{kind}: {err}");
    }
}

#[test]
fn too_many_steps_is_an_error() {
    for kind in SchedulerKind::ALL {
        let err = build(kind, &SchedulerConfig::default(), 1001)
            .err()
            .expect("1001 steps fails");
        assert!(
            matches!(
                err,
                SchedulerError::TooManySteps {
                    steps: 1001,
                    max: 1000
                }
            ),
            "{kind}: {err}"
        );
    }
    // "leading" with steps_offset 1 reaches timestep 1000 at 1000 steps: DDIM cannot index it,
    // and DPM++'s leading step ratio 1000 // 1001 is 0.
    assert!(build(SchedulerKind::Ddim, &SchedulerConfig::default(), 1000).is_err());
    assert!(build(SchedulerKind::Ddim, &SchedulerConfig::default(), 999).is_ok());
    assert!(build(SchedulerKind::DpmPp2m, &SchedulerConfig::default(), 1000).is_err());
    assert!(build(SchedulerKind::DpmPp2m, &SchedulerConfig::default(), 999).is_ok());
    assert!(build(SchedulerKind::Euler, &SchedulerConfig::default(), 1000).is_ok());
}

#[test]
fn unsupported_settings_are_errors() {
    let cases = [
        SchedulerConfig {
            timestep_spacing: "karras".into(),
            ..Default::default()
        },
        SchedulerConfig {
            prediction_type: "sample".into(),
            ..Default::default()
        },
        SchedulerConfig {
            beta_schedule: "squaredcos_cap_v2".into(),
            ..Default::default()
        },
        SchedulerConfig {
            num_train_timesteps: 1,
            ..Default::default()
        },
    ];
    for config in &cases {
        for kind in SchedulerKind::ALL {
            let err = build(kind, config, 4).err().expect("unsupported setting fails");
            assert!(matches!(err, SchedulerError::Unsupported(_)), "{kind}: {err}");
        }
    }
}

#[test]
fn names_parse_and_print() {
    let names = [
        ("euler", SchedulerKind::Euler),
        ("euler-a", SchedulerKind::EulerAncestral),
        ("euler-ancestral", SchedulerKind::EulerAncestral),
        ("ddim", SchedulerKind::Ddim),
        ("dpm++2m", SchedulerKind::DpmPp2m),
        ("dpmpp-2m", SchedulerKind::DpmPp2m),
        ("dpmpp2m", SchedulerKind::DpmPp2m),
        ("DDIM", SchedulerKind::Ddim),
    ];
    for (name, kind) in names {
        assert_eq!(name.parse::<SchedulerKind>().expect("valid name"), kind);
    }
    for kind in SchedulerKind::ALL {
        assert_eq!(
            kind.to_string()
                .parse::<SchedulerKind>()
                .expect("display name parses"),
            kind
        );
    }
    assert_eq!(SchedulerKind::EulerAncestral.to_string(), "euler-a");
    assert_eq!(SchedulerKind::DpmPp2m.to_string(), "dpm++2m");
}

#[test]
fn unknown_name_is_an_error() {
    let err = "heun".parse::<SchedulerKind>().expect_err("unknown name fails");
    assert!(matches!(&err, SchedulerError::UnknownKind(name) if name == "heun"));
    let message = err.to_string();
    for name in ["euler", "euler-a", "ddim", "dpm++2m"] {
        assert!(message.contains(name), "{message}");
    }
}

#[test]
fn config_deserializes_from_sdxl_json() {
    let json = r#"{
        "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": false, "interpolation_type": "linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false,
        "skip_prk_steps": true, "steps_offset": 1, "timestep_spacing": "leading",
        "trained_betas": null, "use_karras_sigmas": false
    }"#;
    let config: SchedulerConfig = serde_json::from_str(json).expect("SDXL config parses");
    let default = SchedulerConfig::default();
    assert_eq!(config.num_train_timesteps, default.num_train_timesteps);
    assert_eq!(config.beta_start, default.beta_start);
    assert_eq!(config.beta_end, default.beta_end);
    assert_eq!(config.beta_schedule, default.beta_schedule);
    assert_eq!(config.timestep_spacing, default.timestep_spacing);
    assert_eq!(config.steps_offset, default.steps_offset);
    assert_eq!(config.prediction_type, default.prediction_type);
    assert_eq!(config.use_karras_sigmas, default.use_karras_sigmas);
}

#[test]
#[should_panic(expected = "in order")]
fn dpm_steps_out_of_order_panic() {
    let mut scheduler = build(SchedulerKind::DpmPp2m, &SchedulerConfig::default(), 4).expect("builds");
    let mut sample = vec![0.5f32; 4];
    let mut noise = Recorded { rows: &[], next: 0 };
    scheduler.step(1, &[0.1; 4], &mut sample, &mut noise);
}
