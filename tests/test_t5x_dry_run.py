"""`python -m phatgoose_jax.t5x_dry_run`: t5x's own train step and eval programs, from t5x gin files, compiled
for a TPU slice or the local devices; argument bytes against the `jax.eval_shape` arithmetic of t5x's train
state, a configuration too large for a chip and bad input refused with one line."""
import math
import sys

import flax
import gin
import pytest

pytest.importorskip("t5x")

import t5x.gin_utils  # noqa: E402
import t5x.utils  # noqa: E402

from phatgoose_jax import aot, t5x_dry_run  # noqa: E402
from phatgoose_jax import library as lib  # noqa: E402
from phatgoose_jax.checkpoints import native  # noqa: E402

from random_trees import TINY, random_expert, random_params  # noqa: E402

TRAIN = ["--gin_file=gin/t5x/examples/tiny_offline_train_expert.gin", "--gin.MODEL_DIR='/tmp/unused'",
         "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}",
         "--gin.t5x.trainer.Trainer.num_microbatches=2"]
# t5x has no default mesh for a v5e: a (2, 1, 1, 1) model-parallel tile, so data=2 x model=2 on a 2x2 slice;
# the vocabulary grows to 260 so that the `vocab` axis splits over `model`.
V5E = ["--topology", "v5e:2x2", "--gin.partitioning.PjitPartitioner.num_partitions=None",
       "--gin.partitioning.PjitPartitioner.model_parallel_submesh=(2, 1, 1, 1)", "--gin.T5Config.vocab_size=260"]
EVAL = ["--gin_file=gin/t5x/examples/tiny_offline_eval.gin", "--gin.CHECKPOINT_PATH='/tmp/unused'",
        "--gin.EVAL_OUTPUT_DIR='/tmp/unused'", "--gin.utils.DatasetConfig.batch_size=4",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}"]


@pytest.fixture(autouse=True)
def clean_gin():
  yield
  gin.clear_config()


def _rows(out: str) -> dict:
  """{program: [args, temp, out, need] MiB and 'yes'/'NO'} from the printed table."""
  return {p[0]: [float(x) for x in p[1:5]] + [p[5]] for p in map(str.split, out.splitlines())
          if len(p) == 10 and p[0] in ("train_step", "score_batch", "predict_batch")}


def _state_and_batch(argv, run: str) -> tuple:
  """t5x's abstract train state, its PartitionSpecs and the batch shapes of the configuration `argv`."""
  args = [arg.split("=", 1) for arg in t5x.gin_utils.rewrite_gin_args(argv)]
  t5x_dry_run.parse([v for k, v in args if k == "--gin_file"], [v for k, v in args if k == "--gin_bindings"])
  _, configured = t5x_dry_run.configured_run()
  model, partitioner = (t5x_dry_run.built(configured, k) for k in ("model", "partitioner"))
  config = "train_dataset_cfg" if run == "train" else "dataset_cfg"
  shapes = t5x_dry_run.input_shapes(model, configured, config, pack=False)
  initializer = t5x.utils.TrainStateInitializer(model.optimizer_def if run == "train" else None,
                                                model.get_initial_variables, shapes, partitioner)
  return initializer.global_train_state_shape, initializer.train_state_axes, shapes


def _shards(tree, specs, shapes, mesh: dict) -> list:
  """(per-chip shape, itemsize) of every leaf of `tree` (nested dicts) under its PartitionSpec in `specs`, and
  of every batch feature (rows split over `data`)."""
  specs = flax.traverse_util.flatten_dict(flax.core.unfreeze(specs))
  shards = []
  for key, x in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items():
    spec = tuple(specs[key] or ()) + (None,) * x.ndim
    shards.append(([n // mesh.get(a, 1) for n, a in zip(x.shape, spec)], x.dtype.itemsize))
  return shards + [([rows // mesh["data"], n], 4) for rows, n in shapes.values()]


def _bytes(shards) -> int:
  return sum(math.prod(shape) * size for shape, size in shards)


def _tile_padded(shards) -> int:
  """The same shards padded as a TPU lays them out at most: the last two dimensions to (8, 128) tiles, a vector
  or scalar to 1024 elements (and at least 512 bytes)."""
  total = 0
  for shape, size in shards:
    if len(shape) >= 2:
      total += math.prod(shape[:-2]) * -(-shape[-2] // 8) * 8 * -(-shape[-1] // 128) * 128 * size
    else:
      total += max(512, -(-math.prod(shape) // 1024) * 1024 * size)
  return total


@pytest.fixture
def reports(monkeypatch) -> dict:
  """{program: aot.Report} of the tables the dry run prints."""
  seen, original = {}, aot.format_reports

  def spy(reps, devices, topology):
    seen.update((r.name, r) for r in reps)
    return original(reps, devices, topology)

  monkeypatch.setattr(aot, "format_reports", spy)
  return seen


def test_train_step_compiles_for_a_v5e_slice_on_t5x_train_state_bytes(reports, capsys):
  """The arguments are t5x's train state (params and optimizer state) and the batch, each split over the
  (data, model) mesh by t5x's rules; on a TPU each array padded at most to its tiles."""
  pytest.importorskip("libtpu")
  assert t5x_dry_run.main(TRAIN + V5E) == 0
  out = capsys.readouterr().out
  assert "t5x mesh: data=2 x model=2" in out and "compiled for v5e:2x2: 4 x TPU v5 lite" in out
  assert list(_rows(out)) == ["train_step"] and _rows(out)["train_step"][4] == "yes"
  assert _rows(out)["train_step"][0] == round(reports["train_step"].argument / 2 ** 20, 1)
  state, axes, shapes = _state_and_batch(TRAIN + V5E[2:], "train")
  shards = _shards(state.state_dict(), axes.state_dict(), shapes, {"data": 2, "model": 2})
  assert _bytes(shards) <= reports["train_step"].argument <= _tile_padded(shards)


def test_without_a_topology_score_and_predict_compile_on_the_local_cpu(reports, capsys):
  """On the local CPU device the arguments are exactly the params (an eval has no optimizer) and the batch
  (of which decoding reads the encoder's tokens only)."""
  assert t5x_dry_run.main(EVAL) == 0
  rows = _rows(capsys.readouterr().out)
  assert sorted(rows) == ["predict_batch", "score_batch"] and all(r[4] == "yes" for r in rows.values())
  state, axes, shapes = _state_and_batch(EVAL, "eval")
  expected = _bytes(_shards(state.params, axes.params, shapes, {"data": 1}))
  assert reports["score_batch"].argument == expected
  decoder_features = 3 * math.prod(shapes["decoder_input_tokens"]) * 4  # decoding reads only their shape
  assert reports["predict_batch"].argument == expected - decoder_features


@pytest.fixture
def routed(tmp_path) -> list:
  """gin/t5x/routed.gin over a library of two gated experts of a tiny native base."""
  base = random_params()
  native.save_native(str(tmp_path / "base"), {"params": base}, TINY)
  library = lib.ExpertLibrary(str(tmp_path / "library"))
  for seed, name in enumerate(["a", "b"]):
    lora, gates = random_expert(seed, rank=4)
    library.add(name, lora, base=lib.base_fingerprint(TINY, base), gates=gates, dataset=f"{name}_data")
  return ["--gin_file=gin/t5x/models/t5_1_1_tiny.gin", "--gin_file=gin/t5x/routed.gin",
          f"--gin.LIBRARY='{library.path}'", f"--gin.CHECKPOINT_PATH='{tmp_path / 'base'}'",
          "--gin.MIXTURE_OR_TASK_NAME='unused'", "--gin.EVAL_OUTPUT_DIR='/tmp/unused'"] + EVAL[3:]


def test_a_routed_model_scores_with_its_library_experts_in_the_arguments(routed, reports, capsys):
  assert t5x_dry_run.main(routed) == 0
  assert sorted(_rows(capsys.readouterr().out)) == ["predict_batch", "score_batch"]
  state, axes, shapes = _state_and_batch(routed, "eval")
  assert "experts" in state.params
  assert reports["score_batch"].argument == _bytes(_shards(state.params, axes.params, shapes, {"data": 1}))


def _error(capsys) -> str:
  """The one error line of the entry point (libtpu writes lines of its own to stderr)."""
  lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("python -m phatgoose_jax")]
  assert len(lines) == 1
  return lines[0].split(": error: ", 1)[1]


def test_an_oversized_batch_exits_2_naming_the_program(capsys):
  pytest.importorskip("libtpu")
  huge = ["--gin.BATCH_SIZE=65536", "--gin.TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 8}"]
  assert t5x_dry_run.main(TRAIN + V5E + huge) == 2
  assert _error(capsys).startswith("program 'train_step' ")


@pytest.mark.parametrize("argv,error", [
    (["--gin_file=gin/t5x/missing.gin"], "bad gin configuration: "),
    (TRAIN + ["--gin.BATCH_SIZE"], "Gin bindings must be of the form '--gin.<param>=<value>'"),
    (["--gin_file=gin/t5x/models/t5_1_1_tiny.gin"], "configure neither t5x's train nor its evaluate"),
    (EVAL[:-1], "a dry run needs the feature lengths of the run's dataset_cfg"),
    (TRAIN + ["--topology", "v5e:2x2"], "t5x's PjitPartitioner finds no mesh for 4 x TPU v5 lite"),
    (TRAIN + ["--topology", "v9z:1"], "unknown or unsupported TPU topology 'v9z:1'")])
def test_bad_input_is_one_line_and_exit_2(argv, error, capsys):
  if "--topology" in argv:
    pytest.importorskip("libtpu")
  assert t5x_dry_run.main(argv) == 2
  assert error in _error(capsys)


def test_a_topology_without_libtpu_says_how_to_install_it(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu raises ImportError
  assert t5x_dry_run.main(TRAIN + ["--topology", "v5e:2x2"]) == 2
  assert "needs libtpu: pip install 'jax[tpu]" in _error(capsys)
