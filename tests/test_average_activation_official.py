"""Average activation's batches and sample as the official code forms them (algorithm.md §5): each dataset's
own training batch size (src/procedures/utils/batcher.py:136) and the seeded draw over all (example, template)
pairs (colm/experiments/bash_scripts/reinit_router_embedding.sh:103, src/data/p3.py:96-112)."""
import functools

import numpy as np

from phatgoose_jax import assembly
from phatgoose_jax import data as data_lib
from phatgoose_jax import library as lib
from phatgoose_jax import routers
from phatgoose_jax.checkpoints import names
from phatgoose_jax.models import EOS_ID, EncoderDecoderModel
from phatgoose_jax.routers import average_activation as aa
from phatgoose_jax.tasks import flan, sources

from random_trees import TINY, random_expert
from test_baselines_official import LORA, greedy_rows, numpy_official_average, params  # noqa: F401  (fixture)

# (task, the batch_size of its dataset's official TRAIN scope): colm/datasets/p3_t5xl.gin lines 21, 58, 603,
# 1110; colm/datasets/flanv2_t5xl.gin lines 23, 125, 2065, 2133.
OFFICIAL_BATCH_SIZES = (("p3_social_i_qa", 32), ("p3_wiki_qa", 16), ("flan_P3Wikihop", 2),
                        ("flan_P3Racemiddle", 2), ("flan_Flanv2zsAi2arceasy", 16), ("flan_Flanv2zsDrop", 2),
                        ("flan_Niv2zsMisc", 8), ("flan_Flanv2zsWikidialogii", 2))


def test_every_pool_dataset_has_its_official_training_batch_size():
  assert set(sources.TRAIN_BATCH_SIZE) == {expert for expert, _, _ in flan.FLAN_EXPERTS}
  for task, size in OFFICIAL_BATCH_SIZES:
    assert sources.train_batch_size(task) == size, task
  assert {sources.train_batch_size(f"p3_{s.key}") for s in sources.P3_HELD_IN} == {2, 4, 8, 16, 32}
  assert sources.train_batch_size("my_rows.jsonl") is None and sources.train_batch_size("p3_held_in") is None


def test_expert_data_is_batched_by_its_datasets_official_batch_size(tmp_path, params, monkeypatch):  # noqa: F811
  library = lib.ExpertLibrary(str(tmp_path / "lib"))
  for i, (name, task) in enumerate([("wiki", "p3_wiki_qa"), ("drop", "flan_Flanv2zsDrop"), ("mine", "my.jsonl")]):
    library.add(name, random_expert(i, 4)[0], base=lib.base_fingerprint(TINY, params), dataset=task)
  rows = {"encoder_input_tokens": np.ones((40, 3), np.int32), "inputs_pretokenized": np.array(["x"] * 40, object)}
  monkeypatch.setattr(data_lib, "examples", lambda *args, **kwargs: dict(rows))
  batched = assembly.expert_data(library, ["wiki", "drop", "mine"], data_lib.NOTHING_HELD_OUT, None, 8)
  assert [len(b["encoder_input_tokens"]) for b in batched["wiki"]] == [16, 16, 8]
  assert [len(b["encoder_input_tokens"]) for b in batched["drop"]] == [2] * 20
  assert [len(b["encoder_input_tokens"]) for b in batched["mine"]] == [8] * 5  # a user's dataset: the configured size


def finished_pool(params, lora, count=60):  # noqa: F811
  """Encoder rows whose greedy generation emits EOS within the official length, and their generations."""
  model, variables = EncoderDecoderModel(TINY, LORA), {"params": params, "lora": names.unflatten(lora)}
  pool = np.random.default_rng(0).integers(2, TINY.vocab_size, (count, 9)).astype(np.int32)
  pool[::3, 6:] = 0
  generated = greedy_rows(model, variables, pool)
  finished = np.any(generated == EOS_ID, axis=1)
  return pool[finished], generated[finished]


def test_average_activation_runs_the_sample_in_its_datasets_batch_size(tmp_path, params, monkeypatch):  # noqa: F811
  library = lib.ExpertLibrary(str(tmp_path / "lib"))
  lora, gates = random_expert(0, 4)
  library.add("a", lora, base=lib.base_fingerprint(TINY, params), gates=gates, dataset="p3_wikihop")
  tokens, generated = finished_pool(params, lora)
  size = len(tokens) - 2
  monkeypatch.setattr(aa, "sample_pairs", functools.partial(aa.sample_pairs, size=size))
  data = {"a": [{"encoder_input_tokens": tokens[i:i + 4]} for i in range(0, len(tokens), 4)]}
  collection = routers.build("average_activation", library, ["a"], params=params, data=data, top_k=1)[1]
  sample = np.random.default_rng(42).choice(len(tokens), size, replace=False)
  expected, steps = numpy_official_average(params, lora, tokens[sample], generated[sample], batch_size=4)
  assert len(set(steps)) > 1  # the batches end at different steps: the batch size changes the decoder vectors
  flat = names.flatten(collection)
  for path, vector in expected.items():
    np.testing.assert_allclose(flat[f"{path}/router"][0], vector, rtol=1e-4, atol=1e-5)
