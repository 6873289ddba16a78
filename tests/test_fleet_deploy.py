"""The fleet's deployment runtime through real Flower 1.42 processes on 127.0.0.1: a SuperLink with TLS and
SuperNode authentication, SuperNodes from the device venv confined to device profiles, a node without a
registered key refused, a node killed mid-round that rejoins, and nothing left running after an interrupt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from fleet_support import PLAN, fleet_plan

from edge_ft.emulation import cgroups
from edge_ft.emulation.cgroups import CgroupJob, CgroupUnavailable
from edge_ft.emulation.hostspeed import HostSpeed
from edge_ft.fleet.certs import make_node_key, make_tls
from edge_ft.fleet.deploy import DEVICE_BUNDLE, DeployConfig, Fault, Federation, free_port, run_federation, run_fleet
from edge_ft.fleet.processes import RUN_MARK
from edge_ft.interpreters import find_device_python

DEVICE_BIN = Path(find_device_python()).parent
pytestmark = pytest.mark.skipif(not (DEVICE_BIN / "flower-supernode").exists(),
                                reason="the device venv has no flwr (make device-venv)")
# A mixed fleet. CPU quotas are lifted (cpu_cap=False) so the tests take this machine's time, not a Zero 2 W's;
# memory caps, cpusets and thread counts are the boards'.
PROFILES = ["rpi-zero-2w", "rpi-4b-2gb"]


def _cgroups_usable() -> bool:
    try:
        CgroupJob.create(64 << 20, [sorted(os.sched_getaffinity(0))[0]], None, None, 20_000).remove()
    except CgroupUnavailable:
        return False
    return True


CGROUPS = _cgroups_usable()


def flower_processes(run_dir: Path) -> list[str]:
    """Live processes started for this run (every one carries RUN_MARK=run_dir in its environment)."""
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if p.environ().get(RUN_MARK) == str(run_dir) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        except psutil.Error:
            continue
    return found


def our_cgroups(owner: int) -> list[Path]:
    """edge-ft cgroups created by process `owner` that still exist, in every controller."""
    own = cgroups._own_paths()
    left = []
    for controller in ("memory", "cpuset", "cpu"):
        mount = cgroups._v1_mount(controller)
        if mount is not None:
            left += list((mount / own.get(controller, "/").lstrip("/")).glob(f"{cgroups.PREFIX}{owner}.*"))
    return left


def log_text(path: str | Path) -> str:
    return Path(path).read_text(errors="replace")


def test_certificates_chain_and_node_keys_load(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
    from cryptography.hazmat.primitives.serialization.ssh import load_ssh_public_key

    tls = make_tls(tmp_path / "certs")
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises when the CA did not sign it
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    key = load_pem_private_key(tls.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert tls.server_key.stat().st_mode & 0o077 == 0

    node = make_node_key(tmp_path / "keys", 3)
    private = load_ssh_private_key(node.private.read_bytes(), None)
    public = load_ssh_public_key(node.public.read_bytes())
    assert isinstance(private.curve, ec.SECP384R1) and node.private.name == "node-03"
    assert private.public_key().public_numbers() == public.public_numbers()


@pytest.mark.slow
def test_two_nodes_two_rounds_with_tls_and_auth(tmp_path, base_checkpoint):
    plan = fleet_plan(tmp_path / "fleet", 2, 2, base_checkpoint)
    # run_dir: fleet/deploy, beside results
    result = run_federation(plan, PROFILES, DeployConfig(cpu_cap=False, progress=False))
    run_dir = plan.results_dir.parent / "deploy"
    assert result.status == "ok", result.message
    # the app evaluates the global model on the server, so devices only train: one message each per round
    assert result.rounds == {1: {"train": [2, 0]}, 2: {"train": [2, 0]}}
    link = log_text(run_dir / "logs" / "superlink.log")
    assert "running on https://127.0.0.1" in link  # TLS
    assert link.count("[Fleet.ActivateNode] Activated node_id") == 2  # both keys were registered and accepted
    for node, profile in zip(result.nodes, PROFILES):
        assert node.profile == profile and node.messages == 2 and sorted(node.round_seconds) == [1, 2]
        assert node.sampled_peak_bytes > 0 and node.peak_rss_by_role.keys() >= {"supernode", "superexec", "clientapp"}
        # every round's memory is recorded, and no round's exceeds the run's peak
        assert sorted(node.pss_by_round) == [1, 2]
        assert 0 < max(node.pss_by_round.values()) <= node.sampled_peak_pss_bytes
        assert not node.oom_killed and node.restarts == 0
        # Flower's client stack (SuperNode, SuperExec, a ClientApp per message) fits the Zero 2 W's 320 MB with the
        # SuperExec and ClientApps started lean (edge_ft.fleet.lean_entry): about 250 MB PSS, 300+ MB without
        assert node.fits
        if CGROUPS:
            assert node.emulation == "cgroup" and 0 < node.cgroup_peak_bytes <= node.budget_bytes
    rounds = [json.loads(line) for line in (plan.results_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds if r["round"] > 0] == [1, 2] and not any(r["rejected"] for r in rounds)
    assert all(len(r["clients"]) == 2 for r in rounds if r["round"] > 0)
    assert (plan.results_dir / "fleet.json").is_file()  # written last: the run finished
    assert (plan.results_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert flower_processes(run_dir) == [] and our_cgroups(os.getpid()) == []
    # the fleet report plots each node's memory per round against its board's budget, from federation.json
    from edge_ft.fleet.report import PLOTS, write_fleet_report

    report = write_fleet_report([plan.results_dir], tmp_path / "report")
    assert (tmp_path / "report" / PLOTS["memory_per_node"]).stat().st_size > 0
    text = report.read_text()
    assert PLOTS["memory_per_node"] in text and all(f"| node-0{i} | {p} |" in text for i, p in enumerate(PROFILES))


@pytest.mark.slow
def test_two_methods_share_one_federation(tmp_path, base_checkpoint):
    """LoRA then probing on the same SuperLink and SuperNodes, started once: each run gets its own results and
    federation.json, the devices keep their data and install the second run's bundle before it."""
    from edge_ft.device.bundle import MANIFEST
    from edge_ft.fleet.plan import PlanConfig, plan_fleet

    lora = fleet_plan(tmp_path / "lora", 2, 1, base_checkpoint)
    probe = plan_fleet(tmp_path / "probe", PlanConfig(
        "probe", task="mnist-digits", num_nodes=2, partitioning="writers", rounds=1, local_steps=3, batch=16,
        aggregation="fedavg", seed=0, base=base_checkpoint, threads=1,
        signing_key=Path(lora.run_config["signing-key"])))  # the devices trust one key
    run_dir = tmp_path / "deploy"
    results = run_fleet([lora, probe], PROFILES, DeployConfig(run_dir=run_dir, cpu_cap=False, progress=False))
    assert [r.status for r in results] == ["ok", "ok"], [r.message for r in results]
    assert [r.rounds for r in results] == [{1: {"train": [2, 0]}}] * 2
    assert results[0].startup_seconds > 0 and results[1].startup_seconds == 0
    assert log_text(run_dir / "logs" / "superlink.log").count("Activated node_id") == 2  # nodes started once
    for plan, result in zip((lora, probe), results):
        assert (plan.results_dir / "fleet.json").is_file()
        saved = json.loads((plan.results_dir.parent / "deploy" / "federation.json").read_text())
        assert [sorted(n["pss_by_round"]) for n in saved["nodes"]] == [["1"], ["1"]]
        assert all(n.messages == 1 and n.restarts == 0 for n in result.nodes)
    installed = json.loads((run_dir / DEVICE_BUNDLE / MANIFEST).read_text())
    assert installed == json.loads((Path(probe.run_config["bundle"]) / MANIFEST).read_text())
    assert flower_processes(run_dir) == [] and our_cgroups(os.getpid()) == []


@pytest.mark.slow
def test_node_without_registered_key_is_refused(tmp_path):
    plan = PLAN(tmp_path / "fleet", 2, 1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fed = Federation(plan, PROFILES, run_dir, tls=True, auth=True, host=HostSpeed.reference(),
                     device_bin=DEVICE_BIN, mode="auto", cpu_cap=False)
    try:
        fed.start_superlink()
        fed.register(fed.nodes[0].key.public)  # node 1's key is never registered
        for node in fed.nodes:
            node.start(fed.address, free_port())
        refused, accepted = fed.nodes[1], fed.nodes[0]
        assert refused.current.proc.wait(90) != 0
        time.sleep(1)
        assert accepted.alive()
    finally:
        fed.shutdown()
    node_log = log_text(refused.current.log)
    assert "Exit Code: 305" in node_log and "Failed to activate SuperNode" in node_log
    link = log_text(fed.link_log)
    assert "No SuperNode found with the given public key" in link
    assert link.count("Activated node_id") == 1
    assert flower_processes(run_dir) == [] and our_cgroups(os.getpid()) == []


@pytest.mark.slow
def test_node_killed_mid_round_rejoins(tmp_path):
    plan = PLAN(tmp_path / "fleet", 2, 3)
    result = run_federation(plan, PROFILES, DeployConfig(run_dir=tmp_path / "run", cpu_cap=False, progress=False,
                                                         fault=Fault(node=1, round=1)))
    assert result.status == "ok", result.message
    assert result.rounds[1]["train"] == [1, 1]  # the round completed with the other node, one failure
    assert result.rounds[3]["train"] == [2, 0]  # the killed node is back by the last round
    killed = result.nodes[1]
    assert killed.restarts == 1 and killed.exit_codes[0] == -signal.SIGKILL
    # The first life died holding round 1's message: it took it and never answered. (Its restart may be handed the
    # same message again by the SuperLink and answer it, too late for the round: that is Flower's timing, not ours.)
    first_life = log_text(tmp_path / "run" / "logs" / "node-01.log")
    assert "Receiving: train message" in first_life and "Sending: train" not in first_life
    # Its second life's train messages were timed. Which round each is filed under comes from when the ServerApp's
    # streamed round line was read, which can trail the node's own log: the server's record above says round 3.
    assert killed.round_seconds and max(killed.round_seconds) >= 2
    assert flower_processes(tmp_path / "run") == [] and our_cgroups(os.getpid()) == []


_DRIVER = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell starts us with SIGINT ignored
from pathlib import Path
sys.path.insert(0, {tests!r})
from fleet_support import PLAN, fleet_plan
from edge_ft.fleet.deploy import DeployConfig, run_federation
run_federation(PLAN(Path({out!r}), 2, 50), {profiles!r},
               DeployConfig(run_dir=Path({run!r}), cpu_cap=False, progress=False))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL])
def test_interrupt_leaves_no_process_or_cgroup(tmp_path, sig):
    if sig == signal.SIGHUP and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        pytest.skip("SIGHUP is ignored here (nohup), so the driver keeps ignoring it, as it should")
    run_dir = tmp_path / "run"
    code = _DRIVER.format(tests=str(Path(__file__).parent), out=str(tmp_path / "fleet"), profiles=PROFILES,
                          run=str(run_dir))
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    run_log = run_dir / "logs" / "run.log"
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and driver.poll() is None:
        if run_log.exists() and "[ROUND 1/50]" in run_log.read_text():
            break
        time.sleep(0.5)
    assert driver.poll() is None, driver.stdout.read()
    assert len(flower_processes(run_dir)) >= 5  # SuperLink, its SuperExec/ServerApp, 2 SuperNodes + SuperExecs
    driver.send_signal(sig)
    out, _ = driver.communicate(timeout=60)
    # the signal became a KeyboardInterrupt (edge_ft.emulation.lifetime.Cancelled); SIGKILL leaves it to the kernel
    # (PR_SET_PDEATHSIG) and the fleet's guardian
    assert driver.returncode == -signal.SIGKILL if sig == signal.SIGKILL else "Cancelled: signal" in out, out
    deadline = time.monotonic() + 30  # as tests/cancel_support.py allows: a guardian on a busy machine is slow
    while time.monotonic() < deadline and (flower_processes(run_dir) or our_cgroups(driver.pid)):
        time.sleep(0.2)
    assert flower_processes(run_dir) == []
    assert our_cgroups(driver.pid) == []


# SecAgg+ quantises each weighted value to 16 / 2^22 (Flower's defaults: clipping range 8, 2^22 levels): ~4e-6 per
# device and value; 1e-4 bounds three devices with room, and the round moves the model by far more.
QUANTISATION = 1e-4
SECAGG_PROFILES = ["rpi-zero-2w", "rpi-4b-2gb", "rpi-4b-2gb"]  # SecAgg+ needs 3 devices to survive a drop-out


def _secagg_plan(out: Path, base: Path, secure: bool, key: Path | None = None):
    """LoRA FedAvg, 3 devices by writer, 1 round; every device sampled (a round waits for all three)."""
    from edge_ft.fleet.plan import PlanConfig, plan_fleet

    return plan_fleet(out, PlanConfig("lora", task="mnist-digits", num_nodes=3, partitioning="writers", rounds=1,
                                      local_steps=3, batch=16, aggregation="fedavg", seed=0, base=base, threads=1,
                                      min_train_nodes=3, min_available_nodes=3, round_timeout=90.0, secagg=secure,
                                      signing_key=key))


def _global(plan) -> dict:
    from edge_ft.checkpoint import load_safetensors
    from edge_ft.fleet import records

    return load_safetensors(records.state_file(plan.results_dir, 1))


def _start(plan) -> dict:
    from edge_ft.device.bundle import load_bundle
    from edge_ft.device.engines import open_engine

    return open_engine(load_bundle(plan.run_config["bundle"])).trainable_state()


def _round_one(plan) -> dict:
    return [json.loads(line) for line in (plan.results_dir / "rounds.jsonl").read_text().splitlines()][1]


@pytest.mark.slow
def test_secagg_through_superlink_and_supernodes_aggregates_what_fedavg_does(tmp_path, base_checkpoint):
    """Plain FedAvg, then SecAgg+, on one SuperLink and the same three SuperNodes (TLS, node auth): the same devices
    train the same data from the same bundle, and the global model after the round agrees within quantisation."""
    plain = _secagg_plan(tmp_path / "plain", base_checkpoint, False)
    secure = _secagg_plan(tmp_path / "secure", base_checkpoint, True, Path(plain.run_config["signing-key"]))
    results = run_fleet([plain, secure], SECAGG_PROFILES,
                        DeployConfig(run_dir=tmp_path / "deploy", cpu_cap=False, progress=False))
    assert [r.status for r in results] == ["ok", "ok"], [r.message for r in results]
    # through the real runtime each device got the protocol's four train messages (setup, key shares, masked
    # vector, unmasking) in the SecAgg+ run, one in the plain run
    assert [n.messages for n in results[0].nodes] == [1, 1, 1]
    assert [n.messages for n in results[1].nodes] == [4, 4, 4]
    assert results[0].rounds == results[1].rounds == {1: {"train": [3, 0]}}  # the watcher reads SecAgg+'s line
    start = _start(plain)
    plain_global, secure_global = _global(plain), _global(secure)
    assert set(secure_global) == set(plain_global) == set(start)
    for name, value in plain_global.items():
        assert np.abs(value - start[name]).max() > 100 * QUANTISATION  # the round moved the model
        np.testing.assert_allclose(secure_global[name], value, atol=QUANTISATION, rtol=0)
    p, s = _round_one(plain), _round_one(secure)
    assert len(p["clients"]) == len(s["clients"]) == 3 and p["drop_reasons"] == s["drop_reasons"] == {}
    assert sorted(c["num-examples"] for c in p["clients"]) == sorted(c["num-examples"] for c in s["clients"])
    assert s["secagg"]["messages"] == 3 * 4 * 2  # four exchanges with each device, a message each way
    assert s["bytes_down"] > p["bytes_down"] and s["bytes_up"] > p["bytes_up"]  # keys, shares, masked vectors
    assert flower_processes(tmp_path / "deploy") == [] and our_cgroups(os.getpid()) == []


@pytest.mark.slow
def test_secagg_survives_a_device_killed_after_sharing_keys(tmp_path, base_checkpoint):
    """SIGKILL one SuperNode when its third train message arrives (the masked-vector stage, its keys shared): the
    survivors' shares rebuild its masks and the round aggregates the other two devices, as plain FedAvg of those two
    does (in process, tests/fleet_grid.py, the same partitions)."""
    from fleet_grid import LocalGrid

    from edge_ft.fleet import client_app, server_app

    secure = _secagg_plan(tmp_path / "secure", base_checkpoint, True)
    fault = Fault(node=1, round=1, rejoin=False, message=3)
    result = run_federation(secure, SECAGG_PROFILES, DeployConfig(run_dir=tmp_path / "run", cpu_cap=False,
                                                                  progress=False, fault=fault))
    assert result.status == "ok", result.message
    assert result.rounds[1]["train"][0] == 2  # results SecAgg+ unmasked
    killed = result.nodes[1]
    assert killed.exit_codes[0] == -signal.SIGKILL and killed.restarts == 0
    life = log_text(tmp_path / "run" / "logs" / "node-01.log")
    assert life.count("Receiving: train message") == 3 and life.count("Sending: train") == 2  # keys shared
    r = _round_one(secure)
    assert len(r["clients"]) == 2 and r["drop_reasons"] == {"no-reply": 1} and r["sampled"] == 3
    plain = _secagg_plan(tmp_path / "plain", base_checkpoint, False)  # the survivors, partitions 0 and 2
    grid = LocalGrid(client_app.app, plain.node_configs, plain.run_config,
                     tamper=lambda node, reply: None if node == 101 else reply)
    server_app.run(grid, server_app.FleetSettings.from_run_config(plain.run_config))
    start, expected, after = _start(secure), _global(plain), _global(secure)
    for name, value in expected.items():
        assert np.abs(value - start[name]).max() > 100 * QUANTISATION
        np.testing.assert_allclose(after[name], value, atol=QUANTISATION, rtol=0)
    assert flower_processes(tmp_path / "run") == [] and our_cgroups(os.getpid()) == []
