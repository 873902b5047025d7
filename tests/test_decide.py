"""The scaler's decisions as pure functions: no processes, no Redis."""

from __future__ import annotations

from inferq.configs import Compute
from inferq.registry import Capacity, Failure, FailureKind, ReplicaRecord, ReplicaStatus
from inferq.scaler.decide import Autoscaler, Load, place, recommend
from inferq.scaler.status import judge

GiB = 1024**3


def compute(**fields) -> Compute:
    fields.setdefault("init_replicas", fields.get("min_replicas", 1))
    return Compute(**fields)


def test_a_backlog_wants_one_replica_per_waiting_or_running_request_within_bounds():
    c = compute(min_replicas=1, max_replicas=4)
    assert recommend(c, Load(queued=0, in_flight=0, live=1)) == 1
    assert recommend(c, Load(queued=2, in_flight=1, live=1)) == 3
    assert recommend(c, Load(queued=50, in_flight=4, live=4)) == 4


def test_cpu_over_target_wants_more_replicas_even_without_a_queue():
    c = compute(min_replicas=1, max_replicas=10, cpu=1000, target_cpu_utilization=50)
    # Two busy replicas each at 900m of a 1000m request, 90% against a 50% target: HPA would
    # want 4, but one request at a time per replica means one spare is what helps.
    assert recommend(c, Load(queued=0, in_flight=2, live=2, cpu=900)) == 3
    assert recommend(c, Load(queued=1, in_flight=2, live=2, cpu=900)) == 4
    assert recommend(c, Load(queued=0, in_flight=1, live=2, cpu=400)) == 2


def test_scale_from_zero_needs_only_a_queued_request():
    c = compute(min_replicas=0, max_replicas=3)
    assert recommend(c, Load()) == 0
    assert recommend(c, Load(queued=1)) == 1


def test_a_new_api_starts_at_init_replicas_and_holds_them_through_the_downscale_window():
    scaler = Autoscaler()
    c = compute(min_replicas=1, max_replicas=5, init_replicas=3)
    assert scaler.desired("a", c, Load(), now=0.0) == 3
    assert scaler.desired("a", c, Load(), now=29.0) == 3
    assert scaler.desired("a", c, Load(), now=31.0) == 1


def test_scale_up_is_immediate_and_scale_down_waits_for_a_quiet_window():
    scaler = Autoscaler()
    c = compute(min_replicas=1, max_replicas=4, downscale_stabilization_period=30.0)
    assert scaler.desired("a", c, Load(), now=0.0) == 1
    assert scaler.desired("a", c, Load(queued=10, in_flight=1, live=1), now=31.0) == 4
    # The load ends; a blip of quiet does not shed replicas...
    assert scaler.desired("a", c, Load(live=4), now=40.0) == 4
    assert scaler.desired("a", c, Load(queued=1, in_flight=2, live=4), now=50.0) == 4
    # ...only what the last 30 s asked for at most (3, at t=50) is let go of.
    assert scaler.desired("a", c, Load(in_flight=2, live=4), now=70.0) == 3
    assert scaler.desired("a", c, Load(live=3), now=81.0) == 3  # 3 was wanted until t=70
    assert scaler.desired("a", c, Load(live=3), now=101.0) == 2
    assert scaler.desired("a", c, Load(live=2), now=112.0) == 1


def test_an_upscale_window_ignores_a_spike_shorter_than_it():
    scaler = Autoscaler()
    c = compute(min_replicas=1, max_replicas=4, upscale_stabilization_period=5.0)
    assert scaler.desired("a", c, Load(), now=0.0) == 1
    assert scaler.desired("a", c, Load(queued=3), now=10.0) == 1
    assert scaler.desired("a", c, Load(), now=11.0) == 1
    assert scaler.desired("a", c, Load(queued=3), now=12.0) == 1
    assert scaler.desired("a", c, Load(queued=3), now=17.5) == 3


def test_new_bounds_apply_at_once():
    scaler = Autoscaler()
    assert scaler.desired("a", compute(min_replicas=1, max_replicas=4), Load(queued=9), 0.0) == 4
    assert scaler.desired("a", compute(min_replicas=1, max_replicas=2), Load(queued=9), 1.0) == 2
    assert scaler.desired("a", compute(min_replicas=3, max_replicas=5), Load(), 2.0) == 3


def host(cpu=4000, mem=16 * GiB, gpus=0) -> Capacity:
    return Capacity(cpu=cpu, mem=mem, gpus=tuple(range(gpus)))


def test_placement_keeps_replicas_where_they_run_and_spreads_new_ones():
    requests = {"a": compute(cpu=1000)}
    hosts = {"x": host(), "y": host()}
    first = place({"a": 2}, requests, hosts, previous={})
    assert first.hosts == {"a": {"x": 1, "y": 1}} and not first.unplaced
    grown = place({"a": 5}, requests, hosts, previous=first.hosts)
    assert sum(grown.hosts["a"].values()) == 5
    assert grown.hosts["a"]["x"] >= 1 and grown.hosts["a"]["y"] >= 1
    shrunk = place({"a": 1}, requests, hosts, previous=grown.hosts)
    assert sum(shrunk.hosts["a"].values()) == 1


def test_gpu_replicas_go_only_where_gpus_are_free_and_the_rest_waits_with_a_reason():
    requests = {"g": compute(gpu=1, cpu=500)}
    hosts = {"a": host(gpus=0), "b": host(gpus=2)}
    placement = place({"g": 3}, requests, hosts, previous={})
    assert placement.hosts == {"g": {"b": 2}}
    count, reason = placement.unplaced["g"]
    assert count == 1
    assert "a: needs gpu 1, host has 0" in reason and "b: needs gpu 1, host has 0 free" in reason


def test_the_single_host_reason_is_the_products_example():
    placement = place({"g": 1}, {"g": compute(gpu=1)}, {"only": host(gpus=0)}, previous={})
    assert placement.unplaced["g"] == (1, "needs gpu 1, host has 0")


def test_cpu_and_mem_requests_limit_how_many_replicas_a_host_takes():
    requests = {"big": compute(cpu=1500, mem=6 * GiB)}
    placement = place({"big": 4}, requests, {"x": host(cpu=4000, mem=16 * GiB)}, previous={})
    assert placement.hosts == {"big": {"x": 2}}
    assert placement.unplaced["big"][0] == 2
    assert "needs cpu 1500m, host has 1 free of 4" in placement.unplaced["big"][1]


def test_a_dead_hosts_replicas_are_placed_again_on_the_living():
    requests = {"a": compute()}
    placement = place({"a": 3}, requests, {"x": host()}, previous={"a": {"x": 1, "gone": 2}})
    assert placement.hosts == {"a": {"x": 3}}


def test_no_scaler_means_compute_unavailable_with_the_reason():
    placement = place({"a": 1}, {"a": compute()}, {}, previous={})
    assert "no scaler is running" in placement.unplaced["a"][1]


def replica(status, version="v2", **fields):
    return ReplicaRecord(f"h-{id(fields)}", ReplicaStatus(status), version=version, **fields)


def test_statuses_follow_their_meaning():
    assert judge("v2", 1, (1, "needs gpu 1, host has 0"), [], [])[0] == "compute unavailable"
    assert judge("v2", 1, None, [], []) == ("pending", None)
    assert judge("v2", 1, None, [replica("creating")], [])[0] == "creating"
    assert judge("v2", 1, None, [replica("live")], [])[0] == "live"
    assert judge("v2", 0, None, [], [])[0] == "stopped"
    failure = Failure(FailureKind.ERROR, "Traceback\n  File x\nZeroDivisionError: boom", 1, "h")
    status, reason = judge("v2", 1, None, [replica("creating")], [failure])
    assert status == "error" and reason.endswith("ZeroDivisionError: boom")
    oom = Failure(FailureKind.OOM, "replica used more memory", 2, "h")
    assert judge("v2", 2, None, [replica("live")], [oom])[0] == "error (out of memory)"
    # Recovered: every wanted replica of the deployed version is live again.
    assert judge("v2", 1, None, [replica("live")], [oom])[0] == "live"
    # During a rollout to a broken version the old version still serves, but it is an error.
    assert judge("v2", 1, None, [replica("live", version="v1")], [failure])[0] == "error"


def test_idle_cpu_does_not_keep_a_replica_that_min_replicas_zero_lets_go():
    c = compute(min_replicas=0, max_replicas=2, cpu=200)
    assert recommend(c, Load(live=1, cpu=20)) == 0
    assert recommend(c, Load(in_flight=1, live=1, cpu=190)) == 2


def test_busy_gpus_want_a_spare_replica_even_when_the_cpu_idles():
    c = compute(min_replicas=1, max_replicas=4, gpu=1, target_cpu_utilization=60)
    assert recommend(c, Load(in_flight=1, live=1, cpu=20, gpu=95)) == 2
    assert recommend(c, Load(in_flight=1, live=2, cpu=20, gpu=30)) == 1
