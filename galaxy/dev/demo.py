"""scripts/demo --galaxy: Galaxy 26 with the plugin, the worker and the local Kubernetes;
uploads a dataset, runs cat1 and a tool that needs more memory than its first destination
allows, printing each job's Galaxy states as they change, then an interactive tool: prints its
entry point URL and the page fetched from it, and stops it from Galaxy."""

import sys
import time

from harness import (
    free_port,
    fresh_directory,
    GalaxyServer,
    http_fetch,
    log_dir,
    Names,
    TERMINAL_JOB_STATES,
    wait_until,
    Worker,
)


def say(message: str) -> None:
    """One line of the demo."""
    print(f"[demo --galaxy] {message}", flush=True)


def follow(api, job_id: str, label: str, started: float) -> dict:
    """Prints the job's state each time Galaxy's API shows a new one; the final job."""
    last = None
    while True:
        job = api.job(job_id)
        if job["state"] != last:
            last = job["state"]
            extra = f"  (Kubernetes Job {job['external_id']})" if job.get("external_id") and last == "running" else ""
            say(f"  {time.monotonic() - started:6.1f} s  {label}: {last}{extra}")
        if last in TERMINAL_JOB_STATES:
            return job
        time.sleep(0.3)


def interactive_tool(api, history: str, worker: Worker) -> bool:
    """Runs e2e_interactive (a web page on a port), prints its entry point URL and the page
    fetched through the Service the worker made, then stops it from Galaxy; whether it all
    went as expected."""
    say("running e2e_interactive (an interactive tool serving a page)")
    started = time.monotonic()
    job_id, _ = api.run_tool(history, "e2e_interactive", {"port": free_port()})
    api.wait_job(job_id, states=("running",))
    (entry_point,) = wait_until(
        lambda: [ep for ep in api.get("entry_points", job_id=job_id) if ep.get("target")], "its entry point", 60
    )
    name = api.job(job_id)["external_id"]
    say(f"  entry point URL: {entry_point['target']}")
    say(f"  (Kubernetes Job {name}: its Service and Ingress route that host to the tool)")
    target = wait_until(lambda: worker.service_target(name), "the Service's ready endpoint", 60)
    page = wait_until(lambda: http_fetch(target), "the tool to answer", 60)
    say(f"  fetched through the Service ({target}): {page.strip()!r}")
    api.delete(f"entry_points/{entry_point['id']}")
    job = follow(api, job_id, "e2e_interactive, stopped from Galaxy", started)
    wait_until(lambda: worker.kube_object("ingress", name) is None, "its Ingress to go", 60)
    say("  its Service and Ingress are gone with it")
    return job["state"] == "ok" and page.strip().startswith("hello from ")


def main() -> int:
    """Runs the demo; non-zero when a job does not end as expected."""
    names = Names("gxdemo")
    logs = log_dir()
    worker = Worker(names, logs)
    galaxy = GalaxyServer(names, fresh_directory(names.instance), logs)
    try:
        say(f"starting the worker (namespace {names.namespace}, log {worker.log_path})")
        worker.start()
        say(f"starting Galaxy 26 with the k8s_job_worker_galaxy runner at {galaxy.url}")
        started = time.monotonic()
        galaxy.start()
        say(f"Galaxy up in {time.monotonic() - started:.0f} s (log {galaxy.log_path})")
        api = galaxy.api()
        history = api.history("demo")
        dataset = api.upload(history, "chr1\t100\t200\tgene-a\nchr2\t300\t400\tgene-b\n")
        api.wait_dataset(dataset)
        say("uploaded a 2-line dataset (Galaxy's local runner)")

        ok = True
        for label, tool, inputs, expect in (
            ("cat1 on the dataset", "cat1", {"input1": {"src": "hda", "id": dataset}}, "ok"),
            ("e2e_oom (300 MB on a 100 MB destination)", "e2e_oom", {}, "ok"),
        ):
            say(f"running {label}")
            started = time.monotonic()
            job_id, outputs = api.run_tool(history, tool, inputs)
            job = follow(api, job_id, label, started)
            content = api.content(outputs[0]).strip() if job["state"] == "ok" else ""
            say(f"  output: {content!r}; Kubernetes Job {job.get('external_id')}")
            ok = ok and job["state"] == expect
        say("the OOM-killed first attempt was resubmitted by Galaxy to the bigger destination"
            " (its Kubernetes Job name ends in -2: attempt 2)")
        ok = interactive_tool(api, history, worker) and ok
        return 0 if ok else 1
    finally:
        galaxy.stop()
        worker.stop()
        say("stopped Galaxy and the worker")


if __name__ == "__main__":
    sys.exit(main())
