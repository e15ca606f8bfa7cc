"""scripts/bench-galaxy: Galaxy's wall time for cat1, one job and a 20-job batch, through
the plugin (worker + Kubernetes) versus Galaxy's local runner, on one Galaxy server in one
run; and the plugin's share of a job's time, from Galaxy's own log."""

import argparse
import re
import statistics
import sys
from datetime import datetime

from harness import (
    fresh_directory,
    GalaxyServer,
    log_dir,
    Names,
    TERMINAL_JOB_STATES,
    wait_until,
    Worker,
)

TOOLS = {"plugin": "cat1", "local": "cat1_local"}  # the same tool XML, mapped to the two runners
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
SUBMITTED = re.compile(r"\((\d+)/\S+\) submitted to k8s-job-worker \(attempt \d+\), confirmed in ([\d.]+) ms")
TERMINAL = re.compile(r"\((\d+)\) succeeded event received")


def run_jobs(api, history: str, dataset: str, tool: str, count: int) -> tuple[float, list[dict]]:
    """Submits ``count`` cat1 jobs at once; Galaxy's wall time for them (first job created →
    last job's final state recorded, Galaxy's own timestamps: the polling here does not
    blur it), and the jobs."""
    ids = [api.run_tool(history, tool, {"input1": {"src": "hda", "id": dataset}})[0] for _ in range(count)]

    def all_done():
        """The jobs, once all are in a final state."""
        jobs = {job["id"]: job for job in api.get("jobs", history_id=history, limit=1000)}
        done = [jobs[i] for i in ids if i in jobs and jobs[i]["state"] in TERMINAL_JOB_STATES]
        return done if len(done) == len(ids) else None

    jobs = wait_until(all_done, f"{count} {tool} jobs", 900, interval=0.5)
    bad = [job for job in jobs if job["state"] != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} {tool} jobs did not end ok: {bad[0]}")
    jobs = [api.job(job["id"]) for job in jobs]
    first = min(datetime.fromisoformat(job["create_time"]) for job in jobs)
    last = max(datetime.fromisoformat(job["update_time"]) for job in jobs)
    return (last - first).total_seconds(), jobs


def plugin_path_seconds(log_text: str, job_numbers: set[str]) -> dict[str, float]:
    """Per plugin job: request publish start → terminal event received by the consumer (the
    plugin, the broker, the worker, Kubernetes and the tool's own run)."""
    published, received = {}, {}
    for line in log_text.splitlines():
        stamp = LOG_TIME.match(line)
        if not stamp:
            continue
        when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if (m := SUBMITTED.search(line)) and m.group(1) in job_numbers:
            published[m.group(1)] = when - float(m.group(2)) / 1000
        elif (m := TERMINAL.search(line)) and m.group(1) in job_numbers:
            received.setdefault(m.group(1), when)
    return {n: received[n] - published[n] for n in published if n in received}


def galaxy_seconds(job: dict) -> float:
    """The job's life in Galaxy: created → final state recorded."""
    parse = datetime.fromisoformat
    return (parse(job["update_time"]) - parse(job["create_time"])).total_seconds()


def main() -> int:
    """Runs the benchmark and prints the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--single-rounds", type=int, default=5, help="alternating single-job rounds per runner")
    parser.add_argument("--batch", type=int, default=20, help="jobs per batch")
    args = parser.parse_args()

    names = Names("gxbench")
    logs = log_dir()
    worker = Worker(names, logs)
    galaxy = GalaxyServer(names, fresh_directory(names.instance), logs)
    try:
        worker.start()
        galaxy.start()
        api = galaxy.api()
        history = api.history("bench")
        dataset = api.upload(history, "".join(f"chr1\t{i}\t{i + 50}\n" for i in range(0, 5000, 50)))
        api.wait_dataset(dataset)
        for tool in TOOLS.values():  # warm-up: first-use costs (imports, caches) excluded
            run_jobs(api, history, dataset, tool, 1)

        single = {name: [] for name in TOOLS}
        plugin_jobs = []
        for _ in range(args.single_rounds):
            for name, tool in TOOLS.items():
                elapsed, jobs = run_jobs(api, api.history(f"single-{name}"), dataset, tool, 1)
                single[name].append(elapsed)
                if name == "plugin":
                    plugin_jobs += jobs
        batch = {}
        for name, tool in TOOLS.items():
            batch[name], jobs = run_jobs(api, api.history(f"batch-{name}"), dataset, tool, args.batch)
            if name == "plugin":
                batch_jobs = jobs

        def share(jobs):
            """Mean plugin path and mean time in Galaxy of ``jobs`` (seconds)."""
            numbers = {re.sub(r"-a\d+$", "", job["external_id"]).rsplit("-", 1)[-1]: job for job in jobs}
            path = plugin_path_seconds(galaxy.log_text(), set(numbers))
            in_galaxy = [galaxy_seconds(numbers[n]) for n in path]
            return statistics.mean(path.values()), statistics.mean(in_galaxy)

        print()
        print(f"Galaxy 26 + k8s_job_worker_galaxy vs Galaxy's local runner, cat1, one Galaxy server "
              f"(API only, sqlite), 2 cores; Galaxy's wall time (job created → ok)")
        for name in TOOLS:
            print(f"  cat1, one job ({args.single_rounds} rounds, median): {name:6s} "
                  f"{statistics.median(single[name]):6.2f} s   (each: {', '.join(f'{t:.2f}' for t in single[name])})")
        ratio = statistics.median(single["plugin"]) / statistics.median(single["local"])
        print(f"  → plugin / local = {ratio:.2f}×")
        for name in TOOLS:
            print(f"  cat1, {args.batch}-job batch (first created → last ok): {name:6s} {batch[name]:6.2f} s")
        print(f"  → plugin / local = {batch['plugin'] / batch['local']:.2f}×")
        for label, jobs in (("one job", plugin_jobs), (f"{args.batch}-job batch", batch_jobs)):
            path, whole = share(jobs)
            print(f"  plugin share, {label}: request published → terminal event received {path:.2f} s of "
                  f"{whole:.2f} s the job spends in Galaxy ({100 * path / whole:.0f} %; the rest is Galaxy's own: "
                  f"queueing, preparing, setting metadata, finishing)")
        return 0
    finally:
        galaxy.stop()
        worker.stop()


if __name__ == "__main__":
    sys.exit(main())
