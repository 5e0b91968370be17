"""The gin entry point: files found from any directory, overrides applied, bad bindings named before work."""
import pathlib
import subprocess
import sys
import zipfile

import gin
import pytest

from phatgoose_jax import main, train, utils
from phatgoose_jax.cli import UsageError
from phatgoose_jax.cli import main as cli_main

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin"
REQUIRED = ["BASE = '/b'", "TASK = 'demo_reverse'", "LIBRARY = '/l'", "WORKDIR = '/w'"]


@pytest.fixture(autouse=True)
def clean_gin():
  yield
  gin.clear_config()


def test_repo_gin_dir_is_found_from_the_package():
  assert main.GIN_DIR == GIN_DIR
  assert (GIN_DIR / "runs" / "train_expert.gin").is_file()


def test_every_gin_file_parses(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # found through the package's absolute path, not the cwd
  for shadow in ("runs", "models"):  # same-named folders in the working directory change nothing
    (tmp_path / shadow).mkdir()
    (tmp_path / shadow / "train_expert.gin").write_text("this is not gin\n")
    (tmp_path / shadow / "common.gin").write_text("this is not gin\n")
  for path in sorted(p for p in GIN_DIR.rglob("*.gin") if p.parts[len(GIN_DIR.parts)] != "t5x"):  # t5x's own
    main.parse([str(path.relative_to(GIN_DIR))], [], require=False)
    gin.clear_config()


def test_model_files_bind_sizes_and_rank_16():
  for size in ("tiny", "small", "base", "large", "xl", "xxl"):
    main.parse([f"models/t5_1_1_{size}.gin"], [])
    assert gin.query_parameter("phatgoose_jax.utils.model_config.size") == size
    assert utils.lora_config().rank == 16


def test_overrides_are_applied():
  main.parse(["models/t5_1_1_tiny.gin", "runs/train_expert.gin"],
             REQUIRED + ["train.train_expert.num_steps = 7", "train.fit.batch_size = 4"])
  assert gin.query_parameter("train.train_expert.num_steps") == 7
  assert gin.query_parameter("train.fit.batch_size") == 4
  assert gin.query_parameter("%TASK") == "demo_reverse"
  assert gin.query_parameter("optimizers.make_optimizer.learning_rate") == 5e-3
  assert gin.query_parameter("optimizers.make_optimizer.warmup_fraction") == 0.06


def test_flag_forms_split():
  files, bindings, rest = main.split_args(["--gin_file=a.gin", "--gin_file", "b.gin", "--gin.X=1", "--gin", "Y=2",
                                           "--other"])
  assert files == ["a.gin", "b.gin"]
  assert bindings == ["X = 1", "Y=2"]
  assert rest == ["--other"]


@pytest.mark.parametrize("binding", ["train.train_expert.num_stepz = 3", "train.no_such_thing.x = 1",
                                     "train.train_expert.num_steps = (3", "= 4"])
def test_bad_binding_is_named(binding):
  with pytest.raises(UsageError, match="bad gin binding") as error:
    main.parse(["runs/train_expert.gin"], REQUIRED + [binding])
  assert binding in str(error.value)


def test_bad_binding_fails_before_any_work(tmp_path, capsys):
  workdir = tmp_path / "w"
  argv = ["--gin_file=runs/train_expert.gin", f"--gin.WORKDIR='{workdir}'", "--gin.BASE='/b'",
          "--gin.TASK='demo_reverse'", "--gin.LIBRARY='/l'", "--gin.train.train_expert.num_stepz=3"]
  assert main.main(argv) == 2
  assert "num_stepz" in capsys.readouterr().err
  assert not workdir.exists()


def test_missing_required_macro_is_a_usage_error(capsys):
  assert main.main(["--gin_file=runs/train_expert.gin", "--gin.TASK='demo_reverse'"]) == 2
  assert "BASE" in capsys.readouterr().err


def test_unknown_gin_file_is_a_usage_error():
  with pytest.raises(UsageError, match="no_such.gin"):
    main.parse(["no_such.gin"], [])


def test_bad_model_value_fails_at_parse_time():
  with pytest.raises(UsageError, match="bad model configuration"):
    main.parse(["models/t5_1_1_tiny.gin"], ["utils.model_config.overrides = {'d_modl': 8}"])


def test_a_built_wheel_carries_every_gin_file(tmp_path):
  """`pip install .` (non-editable) installs the gin files inside the package, where `GIN_DIR` finds them."""
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(GIN_DIR.parent),
                  "-w", str(tmp_path)], check=True, cwd=tmp_path)
  (wheel,) = tmp_path.glob("phatgoose_jax-*.whl")
  packaged = {n[len("phatgoose_jax/gin/"):] for n in zipfile.ZipFile(wheel).namelist()
              if n.startswith("phatgoose_jax/gin/")}
  assert packaged == {str(p.relative_to(GIN_DIR)) for p in GIN_DIR.rglob("*.gin")}


def test_a_stage_refusal_is_one_line_with_exit_code_2(tmp_path, capsys):
  argv = ["--gin_file=runs/train_expert.gin", f"--gin.BASE='{tmp_path / 'no_base'}'", "--gin.TASK='no_such_task'",
          "--gin.LIBRARY='/l'", f"--gin.WORKDIR='{tmp_path / 'w'}'"]
  assert main.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert "no_such_task" in err and len(err.splitlines()) == 1 and not (tmp_path / "w").exists()


def test_a_wrongly_typed_count_is_refused_by_name():
  with pytest.raises(ValueError, match="batch_size must be a positive integer, got '16'"):
    train.fit(None, {}, [], {}, None, "/never", num_steps=2, batch_size="16")


def test_dry_run_describes_the_run_without_training(tmp_path, capsys):
  argv = ["train-expert", "--base", "/b", "--task", "t", "--library", str(tmp_path / "lib"), "--workdir",
          str(tmp_path / "w"), "--model", "tiny", "--dry_run", "--gin", "main.dry_run.num_experts = 36",
          "--gin", "data.feature_lengths.inputs = 16", "--gin", "data.feature_lengths.targets = 8",
          "--gin", "train.fit.batch_size = 4"]
  assert cli_main(argv) == 0
  out = capsys.readouterr().out
  assert out.startswith("mesh: ") and "experts" in out and "expert           -> expert" in out
  assert not (tmp_path / "w").exists() and not (tmp_path / "lib").exists()
