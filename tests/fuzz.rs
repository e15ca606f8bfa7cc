//! Property-based fuzzing of request parsing, validation and Job spec building: no input
//! panics, and whatever is accepted becomes a Job with valid names and no forbidden fields.
//! CI runs the default budget; for a longer run: `PROPTEST_CASES=200000 cargo test --test fuzz`.

use k8s_job_worker::{
    config::Settings,
    domain::{
        job::{plan_job, JobDefaults},
        naming,
        request::parse_request,
    },
    k8s::render,
};
use proptest::{prelude::*, strategy::ValueTree};
use serde_json::{json, Value};

fn defaults() -> JobDefaults {
    Settings::from_args(["--k8s-galaxy-instance-id", "main", "--k8s-default-limits-memory", "2"])
        .unwrap()
        .job_defaults()
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Requests that are mostly well-formed, with every field drawn from hostile ranges.
fn request() -> impl Strategy<Value = Value> {
    let resource = prop_oneof![
        4 => Just(Value::Null),
        4 => any::<u32>().prop_map(|n| json!(n)),
        4 => (0.0f64..64.0).prop_map(|f| json!(f)),
        4 => "[0-9]{0,4}(m|Mi|Gi|G|k|x)?".prop_map(|s| json!(s)),
        1 => json_value(),
    ];
    (
        prop_oneof![3 => "[ -~]{1,200}", 1 => ".{0,300}"],
        prop::option::of(any::<u32>()),
        prop_oneof![3 => "[ -~]{1,80}", 1 => ".{0,80}"],
        prop_oneof![
            "[a-z0-9./:@-]{1,60}".prop_map(|s| json!(s)),
            ".{0,60}".prop_map(|s| json!(s)),
            ("[a-z.]{0,20}", "[a-z0-9_-]{1,20}", "[a-z0-9.]{0,10}")
                .prop_map(|(o, i, t)| json!({"owner": o, "image": i, "tag": t})),
        ],
        prop::collection::vec(resource, 4),
        prop::option::of(prop_oneof!["[A-Za-z0-9_-]{0,80}", ".{0,30}"]),
        prop::collection::btree_map(
            prop_oneof![3 => "[a-z0-9./-]{1,70}", 1 => ".{0,70}"],
            prop_oneof![3 => "[A-Za-z0-9._-]{0,70}", 1 => ".{0,70}"],
            0..3,
        ),
        prop_oneof![9 => Just(None), 1 => json_value().prop_map(Some)],
    )
        .prop_map(|(job_id, attempt, command, image, res, destination, labels, extra)| {
            let mut v = json!({
                "schema": "k8s-job-worker/job-request/v1", "job_id": job_id, "command_line": command, "image": image,
                "requests_cpu": res[0], "requests_memory": res[1], "limits_cpu": res[2], "limits_memory": res[3],
                "labels": labels,
            });
            if let Some(a) = attempt {
                v["attempt"] = json!(a);
            }
            if let Some(d) = destination {
                v["destination_id"] = json!(d);
            }
            if let Some(extra) = extra {
                v["hostPath"] = extra; // never accepted, whatever it holds
            }
            v
        })
}

static ACCEPTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs after the property (same test binary, alphabetical order is not guaranteed, so it
/// runs the property itself): a generator that never produces valid requests proves nothing.
#[test]
fn the_generator_produces_accepted_requests() {
    let mut runner = proptest::test_runner::TestRunner::default();
    let mut accepted = 0;
    for _ in 0..500 {
        let value = request().new_tree(&mut runner).unwrap().current();
        accepted += usize::from(parse_request(&serde_json::to_vec(&value).unwrap(), 1 << 20).is_ok());
    }
    assert!(accepted > 50, "only {accepted} of 500 generated requests were valid");
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_request(&bytes, 1 << 20);
    }

    #[test]
    fn arbitrary_json_never_panics(value in json_value()) {
        let _ = parse_request(&serde_json::to_vec(&value).unwrap(), 1 << 20);
    }

    #[test]
    fn accepted_requests_make_valid_jobs(value in request()) {
        let body = serde_json::to_vec(&value).unwrap();
        let Ok(req) = parse_request(&body, 1 << 20) else { return Ok(()) };
        ACCEPTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        prop_assert!(value.get("hostPath").is_none(), "a request with a forbidden field was accepted");
        let Ok(plan) = plan_job(&req, &defaults()) else { return Ok(()) };
        let job = render::job(&plan, "ns");
        let name = job.metadata.name.clone().unwrap();
        prop_assert!(naming::is_dns_label(&name), "job name {:?}", name);
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        prop_assert!(naming::is_dns_label(&pod.containers[0].name), "container {:?}", pod.containers[0].name);
        for (k, v) in job.metadata.labels.as_ref().unwrap() {
            prop_assert!(naming::check_label(k, v).is_ok(), "label {}={}", k, v);
        }
        let text = serde_json::to_string(&job).unwrap();
        for forbidden in ["hostPath", "hostNetwork", "privileged", "capabilities", "hostPID"] {
            prop_assert!(!text.contains(forbidden), "{} in {}", forbidden, text);
        }
    }

    #[test]
    fn job_names_are_always_valid(prefix in "[a-z]{1,10}", instance in "[a-z0-9]{1,20}", id in ".{0,300}", attempt in prop::option::of(any::<u32>())) {
        let name = naming::job_name(&prefix, Some(&instance), &id, attempt);
        prop_assert!(naming::is_dns_label(&name), "{:?}", name);
    }
}
