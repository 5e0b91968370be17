"""A reused training workdir: the same run resumes (and says from which step), another run is refused."""
import json
import os

import gin
import numpy as np
import orbax.checkpoint as ocp
import pytest

from phatgoose_jax import library as lib
from phatgoose_jax import train, utils
from phatgoose_jax.checkpoints import hf, names
from phatgoose_jax.demo import suite
from phatgoose_jax.training import workdir as workdirs

import random_trees as trees

IDENTITY = {"stage": "expert", "task": "demo_reverse", "name": "demo_reverse",
            "base": {"config": {"d_model": 32}, "params_sha256": "ab" * 32},
            "config": {"rank": 16, "targets": ("query", "value"), "num_steps": 10, "seed": 0}}


def test_first_use_records_the_owner_and_the_same_run_resumes(tmp_path, capsys):
  workdir = str(tmp_path / "w")
  assert workdirs.claim(workdir, IDENTITY) is None
  with open(os.path.join(workdir, workdirs.OWNER)) as f:
    assert json.load(f) == json.loads(json.dumps(IDENTITY))
  for name in ("4", "12", "20.orbax-checkpoint-tmp-1700000000"):  # 20 never finished
    os.makedirs(os.path.join(workdir, "checkpoints", name))
  assert workdirs.claim(workdir, dict(IDENTITY)) == 12
  assert capsys.readouterr().err.strip() == f"resuming {workdir} from step 12"


@pytest.mark.parametrize("change, expected", [
    ({"task": "demo_upper"}, 'task: "demo_reverse" vs "demo_upper"'),
    ({"name": "B", "stage": "gate"}, 'name: "demo_reverse" vs "B"; stage: "expert" vs "gate"'),
    ({"base": {"config": {"d_model": 32}, "params_sha256": "cd" * 32}}, "base.params_sha256: \"abab"),
    ({"config": dict(IDENTITY["config"], num_steps=20)}, "config.num_steps: 10 vs 20"),
])
def test_another_run_is_refused_naming_both(tmp_path, change, expected):
  workdir = str(tmp_path / "w")
  workdirs.claim(workdir, IDENTITY)
  with pytest.raises(workdirs.WorkdirMismatch, match="belongs to another run") as raised:
    workdirs.claim(workdir, {**IDENTITY, **change})
  assert expected in str(raised.value) and "give this run its own workdir" in str(raised.value)
  assert isinstance(raised.value, ValueError)


def test_the_resumed_step_is_orbax_latest_step(tmp_path):
  folder = str(tmp_path / "w" / "checkpoints")
  with ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(max_to_keep=2)) as manager:
    for step in (3, 7, 11):
      manager.save(step, args=ocp.args.StandardSave({"x": np.full(2, step, np.float32)}))
    manager.wait_until_finished()
    expected = manager.latest_step()
  assert expected == 11 and workdirs.latest_step(str(tmp_path / "w")) == expected


def random_variables(model, seed, **collections):
  """Stands for `utils.init_variables`: random lora and gates of the model's rank, the given collections."""
  lora, gates = trees.random_expert(seed, rank=model.experts.rank)
  return {"lora": names.unflatten(lora), "gates": names.unflatten(gates), **collections}


@pytest.fixture
def stages(tmp_path, monkeypatch):
  """A tiny base, the demo tasks, and the stages' model work stubbed out: the variables are random and `fit`
  returns them as they are."""
  base = str(tmp_path / "base")
  hf.save_hf(base, trees.TINY, trees.random_params())
  suite.register(0, suite.SuiteSizes(train=8, validation=2, held_out=2))
  monkeypatch.setattr(utils, "init_variables", random_variables)
  monkeypatch.setattr(train, "fit", lambda model, variables, *args, **kwargs: variables)
  return base


def test_training_stages_refuse_another_runs_workdir(tmp_path, stages, capsys):
  base, library = stages, str(tmp_path / "lib")
  work = lambda name: str(tmp_path / name)
  train.train_expert(base=base, task="demo_reverse", library=library, workdir=work("w_reverse"), num_steps=2)
  with pytest.raises(workdirs.WorkdirMismatch, match='task: "demo_reverse" vs "demo_upper"'):
    train.train_expert(base=base, task="demo_upper", library=library, workdir=work("w_reverse"), num_steps=2)
  train.train_expert(base=base, task="demo_upper", library=library, workdir=work("w_upper"), num_steps=2)
  train.train_gate(base=base, library=library, name="demo_reverse", workdir=work("g_reverse"), num_steps=2)
  with pytest.raises(workdirs.WorkdirMismatch, match='name: "demo_reverse" vs "demo_upper"'):
    train.train_gate(base=base, library=library, name="demo_upper", workdir=work("g_reverse"), num_steps=2)
  with pytest.raises(workdirs.WorkdirMismatch, match='stage: "expert" vs "multitask"'):
    train.train_multitask(task="demo_reverse", output=work("multi"), workdir=work("w_reverse"), base=base,
                             num_steps=2)
  assert lib.ExpertLibrary(library).names() == ["demo_reverse", "demo_upper"]
  os.makedirs(os.path.join(work("w_reverse"), "checkpoints", "2"))
  capsys.readouterr()
  train.train_expert(base=base, task="demo_reverse", library=str(tmp_path / "lib2"), workdir=work("w_reverse"),
                        num_steps=2)
  assert f"resuming {work('w_reverse')} from step 2" in capsys.readouterr().err


def test_gate_training_of_an_imported_expert_without_a_dataset_names_the_fix(tmp_path, stages):
  """An expert imported without `--dataset` records none: its gate needs `--task`, said in one line."""
  gin.clear_config()  # no task bound by a run file an earlier in-process command parsed
  library = lib.ExpertLibrary(str(tmp_path / "lib"))
  lora, _ = trees.random_expert(0, rank=16)
  library.add("imported", lora, base=lib.base_fingerprint(trees.TINY, hf.load_hf(stages)[1]))
  with pytest.raises(ValueError, match=r"records no training dataset .*--task TASK"):
    train.train_gate(base=stages, library=library.path, name="imported", workdir=str(tmp_path / "g"), num_steps=2)
  assert not os.path.exists(tmp_path / "g")
