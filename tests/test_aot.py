"""`--dry_run [--topology]`: every stage's real programs compiled from shapes, for a TPU slice (libtpu) or the
local devices; bytes against `jax.eval_shape` arithmetic, a configuration too large for a chip refused."""
import math
import sys

import gin
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from phatgoose_jax import aot, main, partitioning, stage_programs, utils
from phatgoose_jax.cli import main as cli_main

SMALL = ["--gin", "data.feature_lengths.inputs = 16", "--gin", "data.feature_lengths.targets = 8"]
STAGES = {
    "train-expert": ["--base", "/b", "--task", "t", "--library", "/l", "--workdir", "/w", "--gin",
                     "train.fit.batch_size = 8", "--gin", "train.selection.batch_size = 8"],
    "train-gate": ["--base", "/b", "--library", "/l", "--name", "e", "--workdir", "/w", "--gin",
                   "train.fit.batch_size = 8"],
    "train-multitask": ["--task", "t", "--output", "/o", "--workdir", "/w", "--gin", "train.fit.batch_size = 8",
                        "--gin", "train.fit.accum_steps = 2", "--gin", "train.selection.batch_size = 8"],
    "evaluate": ["--base", "/b", "--task", "t", "--output_dir", "/o", "--gin", "evaluate.runner.batch_size = 8",
                 "--gin", "main.dry_run.num_experts = 3"],
}
PROGRAMS = {"train-expert": ["train_step", "validation_score"], "train-gate": ["train_step"],
            "train-multitask": ["train_step", "validation_score"],
            "evaluate": ["score_batch", "encode", "decode_step"]}


@pytest.fixture(autouse=True)
def clean_gin():
  yield
  gin.clear_config()


def _table(out: str) -> dict:
  """{program: [args, temp, out, need] MiB} from the printed table."""
  rows = {}
  for line in out.splitlines():
    parts = line.split()
    if len(parts) == 10 and parts[0] in sum(PROGRAMS.values(), []):
      rows[parts[0]] = [float(x) for x in parts[1:5]] + [parts[5]]
  return rows


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_compiles_for_a_v5e_slice_from_shapes(stage, capsys):
  pytest.importorskip("libtpu")
  argv = [stage, "--model", "tiny", "--dry_run", "--topology", "v5e:2x2"] + STAGES[stage] + SMALL
  assert cli_main(argv) == 0
  out = capsys.readouterr().out
  assert "compiled for v5e:2x2: 4 x TPU v5 lite (16.0 GiB, 197 TFLOP/s bf16, 819 GB/s" in out
  rows = _table(out)
  assert sorted(rows) == sorted(PROGRAMS[stage])
  assert all(r[4] == "yes" and r[0] > 0 for r in rows.values())


def _param_bytes_per_device(model, mesh, rules) -> int:
  variables = stage_programs.abstract_variables(model)
  shardings = partitioning.unbox(partitioning.variables_shardings(variables, mesh, rules))
  return sum(partitioning._shard_size(x.shape, s.spec, mesh) * x.dtype.itemsize  # pylint: disable=protected-access
             for x, s in zip(jax.tree.leaves(partitioning.unbox(variables)), jax.tree.leaves(shardings)))


def test_decode_step_holds_its_cache_as_the_decoding_loop_does():
  """The decoding step's cache: rows as the batch's, heads over 'model', a scanned stack's layers whole (not
  split over the batch axes), updated in place (donated: its bytes alias the new cache's)."""
  pytest.importorskip("libtpu")
  main.parse(["models/t5_1_1_tiny.gin", "runs/evaluate.gin"], SMALL[1::2] +
             ["evaluate.runner.batch_size = 8"], require=False)
  config = utils.model_config().replace(scan_layers=True)
  devices = aot.target_devices("v5e:2x2")
  mesh = partitioning.make_mesh(data=1, model=2, expert=2, devices=devices)
  rules = partitioning.standard_logical_axis_rules()
  programs = stage_programs.eval_programs(config, mesh, rules, num_experts=4, top_k=2, counted=False)
  program = {p.name: p for p in programs}["decode_step"]
  cache = program.args[1]["decoder"]["layers"]
  rows = ("data", "expert")
  assert cache["self_attention"]["cached_key"].sharding.spec == P(None, rows, None, "model", None)
  assert cache["encoder_decoder_attention"]["cross_value"].sharding.spec == P(None, rows, None, "model", None)
  assert cache["self_attention"]["cache_index"].sharding.spec == P(None, rows)
  per_chip = sum(partitioning._shard_size(x.shape, x.sharding.spec, mesh) * x.dtype.itemsize  # pylint: disable=protected-access
                 for x in jax.tree.leaves(program.args[1]))
  assert aot.compile_program(program, devices).alias >= per_chip


def test_score_batch_argument_bytes_are_the_eval_shape_arithmetic():
  """On the local CPU device the arguments are exactly the sharded variables plus the batch; on a v5e chip
  the same arrays, each padded at most to the TPU's (8, 128) tiles."""
  main.parse(["models/t5_1_1_tiny.gin", "runs/evaluate.gin"], SMALL[1::2] +
             ["evaluate.runner.batch_size = 8"], require=False)
  config = utils.model_config()
  for topology in (None, "v5e:2x2") if _has_libtpu() else (None,):
    devices = aot.target_devices(topology)
    mesh = partitioning.make_mesh(devices=devices)
    rules = partitioning.standard_logical_axis_rules()
    program = stage_programs.eval_programs(config, mesh, rules, num_experts=3, top_k=2, generate=False)[0]
    report = aot.compile_program(program, devices)
    model = utils.get_model(config, stage_programs.routed_experts(3, 2))
    batch = (16 + 8 + 8) * 4 * (8 // mesh.shape["data"])  # int32 encoder, decoder input and target rows
    expected = _param_bytes_per_device(model, mesh, rules) + batch
    if topology is None:
      assert report.argument == expected
    else:
      assert expected <= report.argument <= _tile_padded_bound(model, mesh, rules) + 3 * 8 * 128 * 4


def test_evaluation_programs_hold_every_variable_in_the_compute_dtype():
  """A bf16 evaluation holds the experts and the router vectors in bf16, as assembly loads them
  (`utils.in_compute_dtype`), so the compiled program reads them as the real run does (not float32 cast per
  call); float32 compute keeps them float32."""
  main.parse(["models/t5_1_1_tiny.gin", "runs/evaluate.gin"], SMALL[1::2] +
             ["evaluate.runner.batch_size = 8"], require=False)
  mesh, rules = partitioning.make_mesh(devices=jax.devices()[:1]), partitioning.standard_logical_axis_rules()
  for dtype in ("bfloat16", "float32"):
    config = utils.model_config().replace(dtype=dtype)
    program = stage_programs.eval_programs(config, mesh, rules, num_experts=3, top_k=2, generate=False,
                                           counted=False)[0]
    experts = jax.tree.leaves(program.args[0]["experts"])
    assert experts and {x.dtype for x in experts} == {jnp.dtype(dtype)}
    assert {x.dtype for x in jax.tree.leaves(program.args[0]["params"])} == {jnp.dtype(dtype)}


def _tile_padded_bound(model, mesh, rules) -> int:
  """Per-device bytes of the sharded variables with every array's last two dimensions padded to (8, 128)."""
  variables = partitioning.unbox(stage_programs.abstract_variables(model))
  shardings = jax.tree.leaves(partitioning.unbox(partitioning.variables_shardings(
      stage_programs.abstract_variables(model), mesh, rules)))
  total = 0
  for x, s in zip(jax.tree.leaves(variables), shardings):
    shape = [-(-n // partitioning._mesh_axes_size(mesh, a)) for n, a in zip(x.shape, tuple(s.spec) + (None,) *
                                                                                     (len(x.shape) - len(s.spec)))]
    shape = ([1, 1] + shape)[-max(2, len(shape)):]
    shape[-1], shape[-2] = -(-shape[-1] // 128) * 128, -(-shape[-2] // 8) * 8
    total += math.prod(shape) * 4
  return total


def _has_libtpu() -> bool:
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    return True
  except ImportError:
    return False


def test_an_oversized_configuration_is_refused_with_the_program_and_shortfall(capsys):
  pytest.importorskip("libtpu")
  argv = ["evaluate", "--model", "tiny", "--dry_run", "--topology", "v5e:2x2", "--base", "/b", "--task", "t",
          "--output_dir", "/o", "--gin", "evaluate.runner.batch_size = 65536", "--gin",
          "data.feature_lengths.inputs = 512", "--gin", "data.feature_lengths.targets = 8"]
  assert cli_main(argv) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("phatgoose")]  # not libtpu's
  assert len(err) == 1 and err[0].startswith("phatgoose evaluate: error: program 'score_batch' does not fit a "
                                             "TPU v5 lite chip: Ran out of memory on HBM")


def test_shortfall_names_the_first_program_that_does_not_fit():
  chip = aot.CHIPS["TPU v4"]
  fits = aot.Report("a", 10 * aot.GiB, 5 * aot.GiB, 1, 0, 1e12, 1e9, 1.0, chip)
  big = aot.Report("b", 20 * aot.GiB, 13 * aot.GiB, aot.GiB, aot.GiB, 1e12, 1e9, 1.0, chip)
  assert aot.shortfall([fits]) is None
  assert fits.roofline_s == pytest.approx(max(1e12 / 275e12, 1e9 / 1228e9))
  assert aot.shortfall([fits, big]).startswith("program 'b' needs 33.00 GiB per chip") and "1.00 GiB short" in \
      aot.shortfall([fits, big])


def test_a_topology_without_libtpu_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu raises ImportError
  with pytest.raises(aot.TopologyError, match=r"needs libtpu: pip install 'jax\[tpu\]==0.10.2'"):
    aot.target_devices("v5e:2x2")


@pytest.mark.parametrize("topology,chips,kind,memory", [
    ("v4:2x2x4", 16, "TPU v4", 32), ("v5p:2x2x4", 16, "TPU v5p", 95), ("v5e:4x4", 16, "TPU v5e", 16)])
def test_a_topology_has_one_device_per_chip_with_the_chips_memory(topology, chips, kind, memory):
  """A v4 or v5p slice is one JAX device per chip (megacore), as on the pod, each with the chip's memory (libtpu
  is in the test extra)."""
  devices = aot.target_devices(topology)
  chip = aot.chip_of(devices)
  assert len(devices) == chips and (chip.name, chip.memory) == (kind, memory * aot.GiB)


def test_topology_without_dry_run_and_a_bad_topology_are_usage_errors(capsys):
  base = ["evaluate", "--model", "tiny", "--base", "/b", "--task", "t", "--output_dir", "/o"]
  assert cli_main(base + ["--topology", "v5e:2x2"]) == 2
  assert "--topology only applies to --dry_run" in capsys.readouterr().err
  if _has_libtpu():
    assert cli_main(base + ["--dry_run", "--topology", "v9z:1"]) == 2
    assert "unknown or unsupported TPU topology 'v9z:1'" in capsys.readouterr().err


@pytest.mark.parametrize("command,programs", [("score", ["score_batch"]), ("generate", ["encode", "decode_step"])])
def test_score_and_generate_compile_from_the_checkpoint_metadata_alone(command, programs, tmp_path, capsys):
  pytest.importorskip("libtpu")
  from phatgoose_jax.checkpoints import hf  # pylint: disable=import-outside-toplevel
  from phatgoose_jax.t5 import config as t5_config  # pylint: disable=import-outside-toplevel
  config = t5_config.preset("tiny")
  model = utils.get_model(config)
  params = partitioning.unbox(model.get_initial_variables(jax.random.key(0)))["params"]
  hf.save_hf(str(tmp_path / "base"), config, jax.tree.map(lambda x: x * 0, params))
  (tmp_path / "base" / "model.safetensors").write_bytes(b"not read by a dry run")
  argv = [command, "--base", str(tmp_path / "base"), "--dry_run", "--topology", "v5e:2x2", "--batch_size", "8"]
  assert cli_main(argv + (["--max_decode_length", "8"] if command == "generate" else [])) == 0
  rows = _table(capsys.readouterr().out)
  assert sorted(rows) == sorted(programs) and all(r[4] == "yes" for r in rows.values())


def _counted(programs, devices) -> dict:
  return {p.name: aot.compile_program(p, devices) for p in programs}


def test_scanned_and_accumulated_programs_count_every_layer_and_micro_batch():
  """XLA counts a loop body once; the reported FLOPs and bytes of a scanned model (and of an accumulated
  step) are those of the same program unrolled (and on the whole batch at once: within 10%, the optimizer's
  update over the gates counted once per micro-batch), memory the program's own."""
  main.parse(["models/t5_1_1_tiny.gin", "runs/train_gate.gin"], SMALL[1::2] + ["train.fit.batch_size = 8"],
             require=False)
  devices = aot.target_devices()
  mesh, rules = utils.sharding(mesh=partitioning.make_mesh(devices=devices))
  config = utils.model_config().replace(num_encoder_layers=4, num_decoder_layers=3)
  evaluation = [_counted(stage_programs.eval_programs(c, mesh, rules, 3, 2, batch_size=8), devices)
                for c in (config, config.replace(scan_layers=True))]
  training = [_counted(stage_programs.train_programs("train_gate", c, mesh, rules, accum=a), devices)
              for c, a in ((config, 1), (config.replace(scan_layers=True), 4))]
  for unrolled, scanned in (evaluation, training):
    assert sorted(unrolled) == sorted(scanned)
    for name, want in unrolled.items():
      got = scanned[name]
      assert got.flops == pytest.approx(want.flops, rel=0.1 if name == "train_step" else 0.02), name
      assert got.bytes_accessed == pytest.approx(want.bytes_accessed, rel=0.25), name
  plain = stage_programs.train_programs("train_gate", config.replace(scan_layers=True), mesh, rules,
                                        accum=4, counted=False)[0]
  assert aot.compile_program(plain, devices).flops < 0.2 * training[1]["train_step"].flops  # one layer, one batch
