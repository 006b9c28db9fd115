"""Each family's tiny recipe (recipes/tiny_<family>.yaml) trained from transformers' own model of the family.

transformers' class of the family (random weights, saved as transformers saves it: one tensor per expert) is the
run's `train.init_from`; 4 CPU ranks (pp2 x dp2 x ep2, the recipes' layout; the backend `auto` picks) run 2 steps
inside the warm-up (lr 0). The first step's loss must be transformers' loss on the same batches within 1e-5, and
`moe export --format hub` must give back every source tensor bit for bit (GLM-4.5-MoE's non-zero score bias too:
its recipe fields from the folder leave the bias update off).

Each family's block then trains from the seed on a parallel layout as on one rank; GLM's run also moves its score
bias (aux-loss-free balancing) and moves layout half-way, and must end with one rank's biases.
"""

from __future__ import annotations

import pytest
import torch
import transformers
import yaml

from moe_model import formats
from moe_model.cli import main as moe
from moe_model.recipe import load_recipe
from moe_model.train.data import StepBatches
from moe_model.train.tracking import read_metrics
from tests.conftest import ROOT
from tests.test_init_from import largest_difference
from tests.launch import failure, launch


def family_folder(kind: str, path, *overrides: str):
    """transformers' own model of `kind` with the shape of recipes/tiny_<kind>.yaml, random weights, saved."""
    config = load_recipe(ROOT / f"recipes/tiny_{kind}.yaml", list(overrides)).moe_config()
    hf_config = formats.family_weights_config(kind, config)
    torch.manual_seed(7)
    model = getattr(transformers, formats.FAMILIES[kind].model_class)(hf_config).eval()
    for name, buffer in model.named_buffers():  # GLM's score bias, zero as transformers initialises it: made to count
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)
    model.save_pretrained(path)
    return model


def recipe_from(tmp_path, folder, **train):
    """tiny_cpu's run (layout, data, schedule) with the folder's model (a family recipe's own model section would
    only restate it)."""
    raw = yaml.safe_load((ROOT / "recipes/tiny_cpu.yaml").read_text())
    raw.pop("model")
    raw["train"].update(init_from=str(folder), **train)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def held_to_one_rank(one: list[dict], many: list[dict], keys=("loss", "lm_loss", "grad_norm"),
                     loads: str = "expert_tokens") -> float:
    """Every logged step of `many` within 1e-4 of `one`'s on `keys`, with the same expert loads (`loads`); returns
    the largest relative difference."""
    assert [m["step"] for m in many] == [m["step"] for m in one]
    worst = 0.0
    for a, b in zip(one, many):
        for key in keys:
            worst = max(worst, abs(a[key] - b[key]) / max(abs(a[key]), 1e-12))
            assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]), (a["step"], key, a[key], b[key])
        assert a[loads] == b[loads], a["step"]
    return worst


@pytest.mark.multirank
@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe", "olmoe", "glm4_moe", "deepseek_v3"])
def test_first_loss_is_transformers_and_export_gives_its_tensors_back(tmp_path, kind):
    source = family_folder(kind, tmp_path / "hf")
    run = tmp_path / "run"
    recipe_path = recipe_from(tmp_path, tmp_path / "hf", steps=2, warmup_steps=2, save_every=2, log_every=1,
                              output_dir=str(run))
    result = launch(4, "tracking.wandb.mode=disabled", recipe=str(recipe_path))
    assert result.returncode == 0, failure(result)
    recipe = load_recipe(recipe_path)
    backend = recipe.strategy(4)[0].moe_backend
    dp = 4 // recipe.parallel.pp
    batches = [ids for rank in range(dp) for ids in StepBatches(recipe, dp, rank).micro_batches(0)]
    with torch.no_grad():
        expected = sum(source(ids, labels=ids).loss.item() for ids in batches) / len(batches)
    first = read_metrics(run)[0]
    print(f"{kind} ({backend}): first step's lm loss {first['lm_loss']:.8f}, transformers' {expected:.8f} "
          f"(relative difference {abs(first['lm_loss'] - expected) / expected:.1e})")
    assert abs(first["lm_loss"] - expected) <= 1e-5 * expected, (first["lm_loss"], expected)

    assert moe(["export", str(run), str(tmp_path / "out"), "--format", "hub"]) == 0
    assert (tmp_path / "out/config.json").read_text().count(f'"model_type": "{kind}"') == 1
    worst = largest_difference(tmp_path / "hf", tmp_path / "out")
    print(f"{kind}: init_from -> 2 steps at lr 0 -> moe export --format hub: largest difference {worst}")
    assert worst == 0.0, worst


# (family recipe, ranks, layout): each family's block trained from the seed on a parallel layout, against one rank
FAMILY_PARITY = {
    # Qwen3-MoE-shaped: 16 fine-grained experts top-4, head_dim apart from hidden/heads, q/k norm per head split over
    # tp (`tensor_parallel.HeadNorm`), on the legacy layer (AutoEP does not run with tp)
    "qwen3_moe_tp2_dp2_ep2_legacy": ("qwen3_moe", 4, ("parallel.tp=2", "parallel.pp=1", "parallel.ep=2",
                                                      "parallel.dp=2")),
    # GLM-4.5-MoE's block (shared expert, sigmoid group-limited routing, routed scale, a dense first layer) with its
    # score bias moved every step, on DeepSpeed's legacy layer (the gate holds the bias; `auto` would pick AutoEP,
    # which the GLM move below runs)
    "glm4_moe_dp2_ep2_legacy": ("glm4_moe", 2, ("parallel.tp=1", "parallel.pp=1", "parallel.ep=2", "parallel.dp=2",
                                                "parallel.moe_backend=legacy")),
    # the same on AutoEP under ZeRO-3 (the only MoE backend DeepSpeed takes there; the bias a buffer of its router)
    "glm4_moe_dp2_ep2_zero3_autoep": ("glm4_moe", 2, ("parallel.tp=1", "parallel.pp=1", "parallel.ep=2",
                                                      "parallel.dp=2", "parallel.zero_stage=3")),
    # DeepSeek-V3's block (multi-head latent attention over GLM's routed block, its bias moved): MLA's heads over 2
    # tensor-parallel ranks (q_b, kv_b by rows, o by columns; q_a, kv_a and their norms whole)
    "deepseek_v3_tp2_dp2_ep2_legacy": ("deepseek_v3", 4, ("parallel.tp=2", "parallel.pp=1", "parallel.ep=2",
                                                          "parallel.dp=2")),
}


@pytest.mark.multirank
@pytest.mark.parametrize("name", list(FAMILY_PARITY))
def test_a_family_block_trains_on_a_parallel_layout_as_on_one_rank(tmp_path, family_single_rank_run, name):
    from tests.layouts import STEPS

    kind, ranks, layout = FAMILY_PARITY[name]
    result = launch(ranks, *layout, *STEPS, f"train.output_dir={tmp_path / 'many'}", recipe=f"recipes/tiny_{kind}.yaml")
    assert result.returncode == 0, failure(result)
    one, many = read_metrics(family_single_rank_run(kind)), read_metrics(tmp_path / "many")
    assert len(one) == len(many) == 7
    worst = held_to_one_rank(one, many, ("loss", "lm_loss", "aux_loss", "grad_norm"),
                             "expert_load_max_over_mean_per_layer")
    print(f"{name}: largest relative difference from one rank over 7 steps {worst:.1e}")
    assert many[-1]["loss"] < many[0]["loss"]


GLM_MANY = ("parallel.tp=1", "parallel.pp=2", "parallel.ep=2", "parallel.dp=2")  # the dense layer 0 on stage 0
GLM_RESUMED = ("parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.dp=2", "parallel.zero_stage=3")


@pytest.mark.multirank
def test_glm_with_its_moving_score_bias_trains_and_resumes_on_other_layouts_as_on_one_rank(tmp_path):
    """GLM-4.5-MoE's whole block (shared expert, sigmoid group-limited routing with a routed scale, a dense first
    layer, q/k norm, q/k/v biases, partial rotary, the score bias moved every step): PP2xDP2xEP2 on DeepSpeed's
    AutoEP (`auto`; the bias a buffer of AutoEP's router, moved by the project) for 4 steps, then resumed as DP2 at
    ZeRO-3 on the model's own block (the bias from the checkpoint's layout-free pieces), against
    one rank uninterrupted: every step's losses within 1e-4 and the same expert loads, and the exported biases
    (the ZeRO-3 one read through DeepSpeed's universal checkpoint and the module files) equal."""
    from tests.layouts import LAST_STEP, SINGLE_RANK, STEPS

    recipe = "recipes/tiny_glm4_moe.yaml"
    one, moved = tmp_path / "one", tmp_path / "moved"
    save = ("train.save_last=true", "train.keep_checkpoints=0")
    for n, overrides in ((1, (*SINGLE_RANK, f"train.output_dir={one}")),
                         (4, (*GLM_MANY, "train.stop_at=4", f"train.output_dir={moved}")),
                         (2, (*GLM_RESUMED, f"train.output_dir={moved}"))):
        result = launch(n, *STEPS, *save, *overrides, recipe=recipe)
        assert result.returncode == 0, failure(result)
    assert ("on another layout (pp 2 -> 1, ep 2 -> 1, moe_backend autoep -> legacy, ZeRO stage 1 -> 3)"
            in result.stderr), failure(result)
    a_lines, b_lines = read_metrics(one), read_metrics(moved)
    assert [m["step"] for m in a_lines] == list(range(1, LAST_STEP + 1))
    worst = held_to_one_rank(a_lines, b_lines)
    print(f"glm4_moe PP2xDP2xEP2 AutoEP -> DP2 ZeRO-3: largest relative difference from one rank over 7 steps {worst:.1e}")
    biases = {}
    for label, run in (("one", one), ("moved", moved)):
        assert moe(["export", str(run), str(tmp_path / f"out_{label}")]) == 0
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"out_{label}", trust_remote_code=True)
        biases[label] = {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    assert len(biases["one"]) == 3  # layers 1-3 (layer 0 is dense)
    for name, bias in biases["one"].items():
        assert torch.equal(bias, biases["moved"][name]), name
        assert bias.abs().max() > 0, name  # moved: 7 steps of +-0.01
    first, last = a_lines[0]["expert_load_max_over_mean"], a_lines[-1]["expert_load_max_over_mean"]
    print(f"glm4_moe one rank: busiest expert's load over the mean {first:.3f} at step 1, {last:.3f} at step 7")


@pytest.mark.multirank
def test_deepseek_v3_moves_layout_and_backend_mid_run_as_on_one_rank(tmp_path, family_single_rank_run):
    """DeepSeek-V3's block (MLA over a dense first layer, shared expert, sigmoid group-limited routing, its score bias
    moved every step): PP2xDP2xEP2 on the legacy layer (stage 0 holds the dense layer and an MoE layer) for 4 steps,
    resumed on DP2xEP2 at ZeRO-3 on AutoEP, against the session's one-rank run: every step within 1e-4, the same
    expert loads."""
    from tests.layouts import LAST_STEP, STEPS

    recipe, run = "recipes/tiny_deepseek_v3.yaml", tmp_path / "moved"
    layouts = ((4, ("parallel.tp=1", "parallel.pp=2", "parallel.ep=2", "parallel.dp=2", "parallel.moe_backend=legacy",
                    "train.stop_at=4")),
               (2, ("parallel.tp=1", "parallel.pp=1", "parallel.ep=2", "parallel.dp=2", "parallel.zero_stage=3")))
    for n, overrides in layouts:
        result = launch(n, *STEPS, "train.save_last=true", *overrides, f"train.output_dir={run}", recipe=recipe)
        assert result.returncode == 0, failure(result)
    assert "on another layout (pp 2 -> 1, moe_backend legacy -> autoep, ZeRO stage 1 -> 3)" in result.stderr, \
        failure(result)
    one, moved = read_metrics(family_single_rank_run("deepseek_v3")), read_metrics(run)
    assert [m["step"] for m in moved] == list(range(1, LAST_STEP + 1))
    worst = held_to_one_rank(one, moved)
    print(f"deepseek_v3 PP2xDP2xEP2 legacy -> DP2xEP2 ZeRO-3 AutoEP: largest relative difference from one rank over "
          f"7 steps {worst:.1e}")
