"""Issue 14, cases 7 and 9-12: every bad input is one line and exit 2 (1 where a check said no), with nothing left
behind. In-process through `moe_model.cli.main` where the command line is the face; one multirank test for the
ranks' own host-memory guard (a user running the deepspeed launcher directly)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from moe_model.cli import main
from moe_model.estimate import count_params, estimate
from moe_model.estimate.guard import host_memory_refusal, host_resident
from moe_model.estimate.planner import plan
from moe_model.recipe import RecipeError, UniqueKeyLoader, load_recipe
from moe_model.train import host_memory
from moe_model.train.corpus import prepare
from moe_model.train.data import prepare_data
from tests.launch import ROOT, SINGLE_RANK, failure, launch

TINY = str(ROOT / "recipes" / "tiny_cpu.yaml")
ONE_RANK = [f"--set={o}" for o in ("parallel.pp=1", "parallel.ep=1", "parallel.dp=1", "train.warmup_steps=1")]
# the case 11: 35.5 GB of estimate for one CPU rank
HUGE_BATCH = ["--set=parallel.micro_batch_size=16384", "--set=train.global_batch_size=16384"]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `moe ARGV`; argparse's own refusals (SystemExit) count as exit codes."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


# case 7: unreadable recipes, unwritable config outputs


def test_binary_recipe_is_one_line(tmp_path, capsys):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"name: x\n\xff\xfe\x00model: {}\n")
    code, out, err = run_cli(capsys, "params", str(path))
    assert code == 2 and out == ""
    assert "is not a text file (byte 0xff at offset 8 is not UTF-8)" in one_line(err)


def test_a_binary_base_recipe_is_one_line_naming_base(tmp_path):
    (tmp_path / "parent.yaml").write_bytes(b"\xff")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nname: child\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(tmp_path / "child.yaml")
    assert err.value.field == "base" and "not a text file" in str(err.value)


def test_config_to_a_folder_is_refused_and_leaves_nothing(tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    code, out, err = run_cli(capsys, "config", TINY, "-o", str(folder))
    assert code == 2 and out == ""
    assert f"-o {folder}: is a folder; name a file in it" in one_line(err)
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs (Linux), where no file can be created")
def test_config_to_an_unwritable_place_is_one_line(capsys):
    code, out, err = run_cli(capsys, "config", TINY, "-o", "/sys/x")
    assert code == 2 and out == ""
    assert "-o /sys/x: cannot write it" in one_line(err)


def test_a_failed_config_write_keeps_the_old_file_whole_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    target = tmp_path / "ds.json"
    target.write_text("old\n")

    def refuse(self, other):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "replace", refuse)
    code, _, err = run_cli(capsys, "config", TINY, "-o", str(target))
    assert code == 2 and "cannot write it (Permission denied)" in one_line(err)
    assert target.read_text() == "old\n" and list(tmp_path.iterdir()) == [target]
    monkeypatch.undo()
    assert run_cli(capsys, "config", TINY, "-o", str(target))[0] == 0  # and a write that works replaces it
    assert json.loads(target.read_text())["train_batch_size"] == 8 and list(tmp_path.iterdir()) == [target]


# case 9: values that parse but mean nothing


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400", "1.0e400"])
def test_infinite_or_nan_floats_are_refused(value, capsys):
    code, out, err = run_cli(capsys, "config", TINY, f"--set=train.lr={value}")
    assert code == 2 and out == "" and "Infinity" not in out
    line = one_line(err)
    assert line.startswith("moe: recipe error: train.lr: must be a finite number"), line


@pytest.mark.parametrize("field", ["hardware.gpu_memory_gb", "model.rope_theta", "train.grad_clip",
                                   "data.validation_fraction", "model.router_aux_loss_coef"])
def test_every_float_field_is_finite(field):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, [f"{field}=.inf"])
    assert err.value.field == field and "finite" in str(err.value)


def test_ordinary_numbers_still_read_as_before(tmp_path):
    recipe = load_recipe(TINY, ["train.lr=1e-4", "model.rms_norm_eps=1e-6", "train.steps=20"])
    assert (recipe.train.lr, recipe.model.rms_norm_eps, recipe.train.steps) == (1e-4, 1e-6, 20)
    assert load_recipe(TINY).train.lr == 5.0e-3  # the file's `5.0e-3`
    recipe = load_recipe(TINY, ["parallel.activation_checkpointing=true", "model.tie_word_embeddings=false"])
    assert recipe.parallel.activation_checkpointing is True and recipe.model.tie_word_embeddings is False


@pytest.mark.parametrize("assignment", ["train.steps=true", "parallel.zero_stage=false", "model.hidden_size=true",
                                        "train.lr=true", "parallel.dp=true", "hardware.mfu=true"])
def test_a_bool_is_not_a_number(assignment, capsys):
    code, _, err = run_cli(capsys, "params", TINY, f"--set={assignment}")
    field, value = assignment.split("=")
    assert code == 2
    assert one_line(err) == (f"moe: recipe error: {field}: is {value} but must be a number; write a number "
                             "(e.g. --set train.steps=20)")


def test_a_key_written_twice_names_the_key_and_both_lines(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text(Path(TINY).read_text() + "train:\n  steps: 5\n")
    first = 1 + Path(TINY).read_text().splitlines().index("train:")
    second = len(Path(TINY).read_text().splitlines()) + 1
    code, _, err = run_cli(capsys, "params", str(path))
    assert code == 2
    assert f"key 'train' appears twice (lines {first} and {second})" in one_line(err)
    assert yaml.safe_load(path.read_text())["train"] == {"steps": 5}  # what PyYAML alone made of it: first dropped


def test_a_nested_duplicate_is_refused_but_yaml_merge_keys_still_override(tmp_path):
    path = tmp_path / "nested.yaml"
    path.write_text("model:\n  hidden_size: 64\n  hidden_size: 32\n")
    with pytest.raises(RecipeError, match="key 'hidden_size' appears twice \\(lines 2 and 3\\)"):
        load_recipe(path)
    merged = "shape: &shape {hidden_size: 64, heads: 4}\nmodel:\n  <<: *shape\n  hidden_size: 32\n"
    assert yaml.load(merged, Loader=UniqueKeyLoader)["model"] == {"hidden_size": 32, "heads": 4}


# case 10: launcher and planner counts


@pytest.mark.parametrize("count", ["0", "-4"])
def test_num_gpus_below_one_is_refused_before_anything(count, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", TINY, "--num-gpus", count, f"--set=train.output_dir={out_dir}")
    assert code == 2 and out == ""
    assert one_line(err) == f"moe train: error: argument --num-gpus: must be at least 1, got {count}; see moe train -h"
    assert not out_dir.exists()


def test_plan_top_0_shows_every_fitting_strategy_and_top_minus_1_is_refused(capsys):
    fitting = len(plan(load_recipe(TINY), 4, "latency").candidates)
    assert fitting > 10  # more than the default table, or the test proves nothing
    code, out, _ = run_cli(capsys, "plan", TINY, "--max-gpus", "4", "--top", "0")
    assert code == 0 and f"top {fitting} strategies" in out
    code, out, _ = run_cli(capsys, "plan", TINY, "--max-gpus", "4", "--top", "0", "--json")
    assert len(json.loads(out)["candidates"]) == fitting
    code, out, err = run_cli(capsys, "plan", TINY, "--top", "-1")
    assert code == 2 and out == ""
    assert one_line(err) == "moe plan: error: argument --top: must be at least 0, got -1; see moe plan -h"


# case 11: CPU ranks and the host's memory


def huge_recipe(*extra: str):
    return load_recipe(TINY, [o.removeprefix("--set=") for o in ONE_RANK + HUGE_BATCH] + list(extra))


def test_host_memory_guard_compares_all_local_ranks_with_available_memory():
    recipe = huge_recipe()
    assert 30e9 < estimate(recipe).peak.total_bytes < 40e9  # the 35.5 GB (the GPU-side figure)
    peak = estimate(recipe, None, host_resident(recipe)).peak.total_bytes  # what the host holds: less the GPU terms
    assert 30e9 < peak < estimate(recipe).peak.total_bytes
    line = host_memory_refusal(recipe, None, 1, available_bytes=23e9)
    assert line.startswith(f"moe: refusing to launch tiny-cpu: its CPU rank needs about {peak / 1e9:.1f} GB but this "
                           "host has 23.0 GB of memory available; e.g. --set "), line
    assert "\n" not in line
    assert host_memory_refusal(recipe, None, 1, available_bytes=peak) is None
    assert host_memory_refusal(recipe, None, 1, available_bytes=2 * peak) is None
    # two ranks on this host need twice the peak
    two = host_memory_refusal(recipe, None, 2, available_bytes=1.5 * peak)
    assert f"2 CPU ranks on this host need about {2 * peak / 1e9:.1f} GB" in two
    # the suggested change really fits the host's share: re-estimate with it, independently of the guard
    fix = line.split("; e.g. ")[1].split(" (peak")[0]
    fixed = load_recipe(TINY, [o.removeprefix("--set=") for o in ONE_RANK + HUGE_BATCH]
                        + [part for part in fix.split() if part != "--set"])
    assert estimate(fixed, None, host_resident(fixed)).peak.total_bytes <= 23e9


def test_host_guard_counts_what_cpu_ranks_touch_not_the_gpu_reserve_or_the_untouched_bucket():
    # 8 ranks of the tiny model trained here for a long time; the GPU-side figure (1.5 GB reserve + a 2 GB fp32
    # reduce bucket per rank) refused them on a 21 GB host
    recipe = load_recipe(TINY, ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.dp=2"])
    gpu_side = estimate(recipe, 8)
    resident = host_resident(recipe)
    assert resident.reserve_bytes == 0 and resident.reduce_bucket_elements == count_params(recipe.moe_config()).total
    assert estimate(recipe, 8, resident).peak.total_bytes < gpu_side.peak.total_bytes - gpu_side.assumptions.reserve_bytes
    assert host_memory_refusal(recipe, 8, 8, available_bytes=21e9) is None
    assert 8 * gpu_side.peak.total_bytes > 21e9  # the GPU-side figure would have refused it


def test_available_memory_reads_meminfo_without_psutil(tmp_path, monkeypatch):
    import sys

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   22000000 kB\n")
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError
    assert host_memory.available_bytes(meminfo) == 22000000 * 1024
    assert host_memory.available_bytes(tmp_path / "missing") is None
    monkeypatch.undo()
    figure = host_memory.available_bytes()
    assert figure is None or 0 < figure <= math.inf


def test_moe_train_refuses_cpu_ranks_beyond_the_hosts_memory_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    from moe_model.train import distributed

    monkeypatch.setattr(distributed, "launch_env", lambda: {"DS_ACCELERATOR": "cpu"})
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 23e9)
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", TINY, *ONE_RANK, *HUGE_BATCH, f"--set=train.output_dir={out_dir}")
    assert code == 1 and out == ""
    assert "but this host has 23.0 GB of memory available" in one_line(err)
    assert not out_dir.exists()
    monkeypatch.setattr(distributed, "launch_env", lambda: {"DS_ACCELERATOR": "cuda"})  # GPUs: their own memory
    assert host_memory.cpu_host_refusal(huge_recipe(), None, 1, "cuda") is None


@pytest.mark.multirank
def test_ranks_started_directly_refuse_beyond_the_hosts_memory(tmp_path):
    # a micro-batch whose estimate is twice this host's available memory, under a GPU budget that lets it pass the
    # GPU guard: only the host guard on the rank stands between it and the allocator
    available = host_memory.available_bytes()
    assert available is not None
    per_sequence = estimate(huge_recipe()).peak.total_bytes / 16384
    micro = 2 ** math.ceil(math.log2(2 * available / per_sequence))
    result = launch(1, *SINGLE_RANK, f"parallel.micro_batch_size={micro}", f"train.global_batch_size={micro}",
                    "hardware.gpu_memory_gb=1000000", "train.steps=1", "train.warmup_steps=1",
                    f"train.output_dir={tmp_path}")
    assert result.returncode == 1, failure(result)
    lines = [line for line in result.stderr.splitlines() if line.startswith("moe:")]
    assert len(lines) == 1 and "its CPU rank needs about" in lines[0] and "of memory available" in lines[0], \
        failure(result)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


# case 12: empty corpora, refused launches, silent preparation


def data_recipe(tmp_path, path, *extra: str):
    return load_recipe(TINY, ["data.source=json", f"data.path={path}", "model.vocab_size=512",
                              f"train.output_dir={tmp_path / 'run'}", *extra])


@pytest.mark.parametrize("content, says", [("", "holds no documents (no records)"),
                                           ("\n\n", "holds no documents (no records)"),
                                           ('{"text": ""}\n', "holds no documents (1 record, no text in 'text')")])
def test_an_empty_corpus_says_it_holds_no_documents(tmp_path, content, says):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    for tokenizer in ("byte", "train"):
        recipe = data_recipe(tmp_path, path, f"data.tokenizer={tokenizer}")
        with pytest.raises(RecipeError) as err:
            prepare(recipe)
        assert err.value.field == "data.path" and says in str(err.value), str(err.value)
        error, summary = prepare_data(recipe)  # what every rank gets before training
        assert error.startswith(f"data.path: '{path}' holds no documents") and summary == {}
    run = tmp_path / "run"
    assert not (run / "tokenizer").exists()
    assert not (run / "data_cache").exists() or not list((run / "data_cache").iterdir())


def test_a_launch_refused_for_its_rank_count_leaves_no_output_folder(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", TINY, "--num-gpus", "3", f"--set=train.output_dir={out_dir}")
    assert code == 2
    assert one_line(err).startswith("moe: recipe error: parallel: world size 3 is not a multiple of tp x pp")
    assert not out_dir.exists()


def test_tokenizer_training_and_caching_say_what_they_do_once(tmp_path, capfd):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} about experts and routers"}) + "\n"
                            for i in range(200)))
    recipe = data_recipe(tmp_path, path, "data.tokenizer=train", "data.vocab_size=300")
    prepare(recipe)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("moe:")]
    assert lines[0] == f"moe: training a byte-level BPE tokenizer (300 ids) on the training documents of {path} ..."
    assert lines[1].startswith("moe: tokenizer trained in ") and lines[1].endswith(" ids)")
    assert lines[2].startswith(f"moe: tokenizing {path} into the token cache ")
    assert lines[3].startswith("moe: token cache written in ") and "train 190 documents" in lines[3]
    assert "validation 10 documents" in lines[3] and len(lines) == 4
    prepare(recipe)  # cached: nothing to say
    assert capfd.readouterr().err == ""


@pytest.mark.multirank
def test_ranks_refused_for_their_count_leave_no_output_folder(tmp_path):
    # case 12 through the launcher directly: the folder is created only once the layout passed on the real world size
    out = tmp_path / "run"
    result = launch(2, *SINGLE_RANK, "parallel.dp=1", f"train.output_dir={out}")
    assert result.returncode == 2, failure(result)
    lines = [line for line in result.stderr.splitlines() if line.startswith("moe:")]
    assert len(lines) == 1 and "the recipe says dp=1 but 2 ranks give dp=2" in lines[0], failure(result)
    assert not out.exists()
