"""The device a run really uses, with the accelerator stood in (no GPU here): the GPU budget bound by the card's
memory, the memory metrics keyed on the engine's device, and the header's device name and peak-TFLOPS warning."""

import resource
import types
from pathlib import Path

import pytest
import torch

from moe_model.cli import main
from moe_model.estimate.estimate import estimate
from moe_model.estimate.guard import launch_refusal
from moe_model.recipe import load_recipe
from moe_model.train import device as device_module
from moe_model.train.console import header
from moe_model.train.device import CPU_NAME, Device, known_peak_tflops, peak_tflops_warning, this_device
from moe_model.train.tracking import memory_metric_name, memory_metrics, run_config_extras
from tests.conftest import ROOT

SEED = str(ROOT / "recipes/seed_4b.yaml")  # sets hardware.peak_tflops: 400 itself
TINY = str(ROOT / "recipes/tiny_cpu.yaml")  # no hardware section: every figure a default
H100 = "NVIDIA H100 80GB HBM3"  # torch.cuda.get_device_name of an H100 SXM


def fake_cards(monkeypatch, *cards: tuple[str, int]) -> None:
    """torch.cuda answering as these cards (name, total bytes) would, on a machine without one; device 0 current."""
    props = [types.SimpleNamespace(name=name, total_memory=total) for name, total in cards]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props[index])


def no_cuda_calls(monkeypatch) -> None:
    """torch.cuda claims a GPU but refuses every query: code that asks it anyway fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA query where the run is not on CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("current_device", "device_count", "get_device_properties", "mem_get_info", "max_memory_allocated",
                 "max_memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, refuse)


@pytest.mark.parametrize("name, tflops", [
    (H100, 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L40S", 362), ("NVIDIA B200", 2250), ("NVIDIA L40", None),
    ("NVIDIA GeForce RTX 4090", None), (CPU_NAME, None)])
def test_known_peaks_match_the_most_specific_name(name, tflops):
    found = known_peak_tflops(name)
    assert (found and found[1]) == tflops  # "H100 PCIe" is not taken for the SXM's 989, "L40" not for the L40S's


def test_the_device_is_cuda_only_where_deepspeeds_accelerator_is(monkeypatch):
    no_cuda_calls(monkeypatch)  # torch.cuda.is_available() says yes, DeepSpeed's accelerator says cpu
    assert this_device("cpu") == Device("cpu", CPU_NAME, None)
    fake_cards(monkeypatch, ("NVIDIA H200", 150_754_820_096))
    card = this_device("cuda")
    assert card == Device("cuda", "NVIDIA H200", 150_754_820_096) and card.as_json()["known_peak_tflops"] == 989
    # before the ranks start (no process group): the smallest card the launch's ranks could get
    fake_cards(monkeypatch, ("NVIDIA H100 80GB HBM3", 85_029_158_912), ("NVIDIA A100-SXM4-40GB", 42_314_694_656))
    assert this_device("cuda") == Device("cuda", "NVIDIA A100-SXM4-40GB", 42_314_694_656)


def test_a_recipe_fitting_64_gb_is_refused_on_a_16_gb_card(monkeypatch):
    recipe = load_recipe(SEED)
    assert launch_refusal(recipe, 8) is None  # 18.6 GB of the recipe's 64 GB: fits
    fake_cards(monkeypatch, ("NVIDIA Test 16GB", 16_000_000_000))
    card = this_device("cuda")
    message = launch_refusal(recipe, 8, card_bytes=card.memory_bytes, card_name=card.name)
    assert message is not None
    first, *rest = message.splitlines()
    assert "of the 16.0 GB per GPU (budget: the NVIDIA Test 16GB's memory, below hardware.gpu_memory_gb 64 GB" in first
    # the same refusal, suggestions included, as the recipe's own figure lowered to the card's (independent path)
    as_recipe = launch_refusal(load_recipe(SEED, ["hardware.gpu_memory_gb=16"]), 8).splitlines()
    assert rest == as_recipe[1:] and len(rest) >= 3
    # a card larger than the recipe's figure leaves the recipe's budget, and the line says so
    tight = load_recipe(SEED, ["parallel.activation_checkpointing=false", "parallel.micro_batch_size=4"])
    line = launch_refusal(tight, 8, card_bytes=150_754_820_096, card_name="NVIDIA H200").splitlines()[0]
    assert "of the 64.0 GB per GPU (budget: hardware.gpu_memory_gb; the NVIDIA H200 has 150.8 GB" in line


def test_moe_estimate_asks_no_device(monkeypatch, capsys):
    no_cuda_calls(monkeypatch)
    monkeypatch.setattr(device_module, "this_device", lambda *a: pytest.fail("moe estimate read the device"))
    assert main(["estimate", SEED, "--gpus", "8", "--set", "hardware.gpu_memory_gb=16"]) == 1  # the recipe's 16
    capsys.readouterr()
    assert main(["estimate", SEED, "--gpus", "8"]) == 0  # a 16 GB card stood in changes nothing before launch
    capsys.readouterr()


def test_cuda_memory_metrics_read_the_engines_device(monkeypatch):
    gb = 10**9
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the engine's device decides, not this
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: asked.append(d) or 30 * gb)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 33 * gb)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (100 * gb, 141 * gb))  # (free, total)
    device = torch.device("cuda", 3)
    metrics = memory_metrics(device)
    assert metrics == {"memory_peak_gb": 30.0, "memory_reserved_peak_gb": 33.0, "device_memory_used_gb": 41.0}
    assert asked == [device] and memory_metric_name(device) == "torch.cuda.max_memory_allocated"


def test_cpu_memory_metric_is_the_peak_rss_only(monkeypatch):
    no_cuda_calls(monkeypatch)
    metrics = memory_metrics(torch.device("cpu"))
    assert set(metrics) == {"memory_peak_gb"}  # the CUDA figures are absent on CPU ranks, not null
    # the kernel's high-water mark of resident memory, read from /proc (ru_maxrss is read through getrusage)
    status = Path("/proc/self/status")
    if status.exists():
        (hwm_kb,) = [int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
        assert metrics["memory_peak_gb"] == pytest.approx(hwm_kb * 1024 / 1e9, rel=0.02)
    assert metrics["memory_peak_gb"] * 1e9 >= 0.9 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert memory_metric_name(torch.device("cpu")) == "peak RSS (ru_maxrss)"


def run_config(recipe, world, engine_device, device):
    return {"layout": {"tp": 1, "pp": 1, "ep": 1, "dp": world, "world_size": world},
            **run_config_extras(recipe, world, engine_device, device)}


def test_header_names_the_device_and_judges_the_card_budget():
    recipe = load_recipe(SEED)
    card = Device("cuda", "NVIDIA Test 16GB", 16_000_000_000)
    config = run_config(recipe, 8, torch.device("cuda", 0), card)
    assert config["estimate"]["budget_bytes"] == 16_000_000_000 and config["estimate"]["fits"] is False
    assert config["device"] == {"kind": "cuda", "name": "NVIDIA Test 16GB", "memory_bytes": 16_000_000_000,
                                "known_peak_tflops": None}
    assert estimate(recipe, 8).budget_bytes == 64_000_000_000  # the recipe itself is unchanged
    first, where = header(recipe, config, None, peak_tflops_warning(recipe, card)).splitlines()
    assert "8 rank(s) on NVIDIA Test 16GB" in first and "of 16 GB, DOES NOT FIT" in first
    cpu = Device("cpu", CPU_NAME)
    config = run_config(load_recipe(TINY), 4, torch.device("cpu"), cpu)  # pp2 x dp2
    assert config["memory_metric"] == "peak RSS (ru_maxrss)" and config["estimate"]["budget_bytes"] == 64e9
    first, _ = header(load_recipe(TINY), config, None, peak_tflops_warning(load_recipe(TINY), cpu)).splitlines()
    assert "moe: tiny-cpu: 4 CPU ranks (gloo), tp1" in first


def test_a_default_peak_tflops_on_a_known_card_is_warned_once(tmp_path):
    h100 = Device("cuda", H100, 85_000_000_000)
    tiny = load_recipe(TINY)
    warning = peak_tflops_warning(tiny, h100)
    lines = header(tiny, run_config(tiny, 4, torch.device("cuda", 0), h100), None, warning).splitlines()
    assert len(lines) == 3 and lines[1] == warning and lines[0].startswith("moe: tiny-cpu: 4 rank(s) on " + H100)
    assert "default 400" in lines[1] and "hardware.peak_tflops=989" in lines[1] and "2.47x" in lines[1]
    unset = tmp_path / "unset.yaml"  # a base: chain that never sets it
    unset.write_text(f"base: {TINY}\nname: unset\nhardware:\n  gpu_memory_gb: 80\n")
    assert peak_tflops_warning(load_recipe(unset), h100) == lines[1]
    assert peak_tflops_warning(tiny, Device("cpu", CPU_NAME)) is None  # nothing to compare with
    assert peak_tflops_warning(tiny, Device("cuda", "NVIDIA GeForce RTX 4090", 24e9)) is None
    assert peak_tflops_warning(load_recipe(SEED), h100) is None  # the recipe says 400: the user's figure
    assert peak_tflops_warning(load_recipe(TINY, ["hardware.peak_tflops=400"]), h100) is None  # --set counts too
    # set in a base recipe only, and the child's own hardware section merged over it: still set
    parent = tmp_path / "parent.yaml"
    parent.write_text(Path(TINY).read_text() + "hardware:\n  peak_tflops: 989\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\nname: child\nhardware:\n  gpu_memory_gb: 80\n")
    assert peak_tflops_warning(load_recipe(child), Device("cuda", "NVIDIA L40S", 48e9)) is None
