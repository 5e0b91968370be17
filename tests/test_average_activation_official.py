"""Average activation's batches and sample as the official code forms them (algorithm.md §5): each dataset's
own training batch size (src/procedures/utils/batcher.py:136) and the seeded draw over all (example, template)
pairs (colm/experiments/bash_scripts/reinit_router_embedding.sh:103, src/data/p3.py:96-112)."""
import json

import numpy as np

from phatgoose_jax import assembly
from phatgoose_jax import data as data_lib
from phatgoose_jax import library as lib
from phatgoose_jax import routers, tasks  # noqa: F401  (registers the P3 tasks)
from phatgoose_jax import vocab as vocab_lib
from phatgoose_jax.checkpoints import names
from phatgoose_jax.models import EOS_ID, EncoderDecoderModel
from phatgoose_jax.tasks import flan, p3, promptsource, sources

from random_trees import TINY, random_expert
from test_baselines_official import LORA, greedy_rows, numpy_official_average, params  # noqa: F401  (fixture)
from test_tasks_p3 import templates_dir  # noqa: F401  (fixture)

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


def test_the_sample_is_batched_by_its_datasets_official_batch_size(tmp_path, params, monkeypatch):  # noqa: F811
  library = lib.ExpertLibrary(str(tmp_path / "lib"))
  for i, (name, task) in enumerate([("wiki", "p3_wiki_qa"), ("drop", "flan_Flanv2zsDrop"), ("mine", "my.jsonl")]):
    library.add(name, random_expert(i, 4)[0], base=lib.base_fingerprint(TINY, params), dataset=task)
  monkeypatch.setattr(data_lib, "sampled_examples", lambda task, count, held_out: {"inputs": ["x"] * count})
  monkeypatch.setattr(assembly, "encoded", lambda task, examples: dict(
      examples, encoder_input_tokens=np.ones((len(examples["inputs"]), 3), np.int32)))
  batched = assembly.sampled_examples(library, ["wiki", "drop", "mine"], data_lib.NOTHING_HELD_OUT, 40, 8)
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


def test_average_activation_runs_the_sample_in_its_batches(tmp_path, params):  # noqa: F811
  library = lib.ExpertLibrary(str(tmp_path / "lib"))
  lora, gates = random_expert(0, 4)
  library.add("a", lora, base=lib.base_fingerprint(TINY, params), gates=gates, dataset="p3_wikihop")
  tokens, generated = finished_pool(params, lora)
  sample = {"a": [{"encoder_input_tokens": tokens[i:i + 4]} for i in range(0, len(tokens), 4)]}
  collection = routers.build("average_activation", library, ["a"], params=params, sample=sample, top_k=1)[1]
  expected, steps = numpy_official_average(params, lora, tokens, generated, batch_size=4)
  assert len(set(steps)) > 1  # the batches end at different steps: the batch size changes the decoder vectors
  flat = names.flatten(collection)
  for path, vector in expected.items():
    np.testing.assert_allclose(flat[f"{path}/router"][0], vector, rtol=1e-4, atol=1e-5)


DREAM_ROWS = [{"id": i, "dialogue_id": f"d{i}", "dialogue": [f"M: Is lunch at {i}?", "W: Yes."],
               "question": f"When is lunch, {i}?", "choice": [f"At {i}.", "Never.", "At noon."], "answer": f"At {i}."}
              for i in range(2001)]


def official_sample_inputs(chosen, rows, count):
  """The inputs the official average-activation run reads from a P3 TRAIN dataset under
  max_examples_per_dataset = count (reinit_router_embedding.sh:103), its rules verbatim: the pair draw
  (src/data/p3.py:96-112, seed 42: src/data/dataset.py:67, 90) and `__getitem__` (lines 122-143), in order."""
  total = len(rows) * len(chosen)
  tuples = np.random.default_rng(42).choice(list(range(total)), count, replace=False).tolist()
  inputs = []
  for idx in tuples:
    parts = promptsource.apply(chosen[idx % len(chosen)], rows[idx // len(chosen)])
    inputs.append(parts[0] if len(parts) == 2 else "<NO INPUT>")
  return tuples, inputs


def test_the_sample_is_drawn_over_all_pairs_not_the_training_subset(templates_dir, tmp_path, params,  # noqa: F811
                                                                    monkeypatch):
  """2001 dream rows x 5 templates = 10,005 pairs, 12 of them trained on: the 8 sampled are drawn from all."""
  (tmp_path / "dream").mkdir()
  (tmp_path / "dream" / "train.jsonl").write_text("\n".join(map(json.dumps, DREAM_ROWS)), encoding="utf-8")
  monkeypatch.setattr(p3, "MAX_TRAIN_PAIRS", 12)
  library = lib.ExpertLibrary(str(tmp_path / "lib"))
  library.add("dream", random_expert(0)[0], base=lib.base_fingerprint(TINY, params), dataset="p3_dream")
  with sources.using_dirs(data_dir=tmp_path):
    inputs = assembly.router_inputs(library, ["dream"], "average_activation", data_lib.NOTHING_HELD_OUT,
                                    activation_examples=8)
  chosen = p3.templates(next(s for s in sources.P3_HELD_IN if s.key == "dream"), train=True)
  tuples, texts = official_sample_inputs(chosen, DREAM_ROWS, 8)
  assert set(tuples) - set(p3.sampled_pairs(len(DREAM_ROWS), len(chosen), 12).tolist())  # not all trained on
  batches = inputs["sample"]["dream"]
  assert [len(b["inputs"]) for b in batches] == [4, 4]  # dream's TRAIN batch_size, colm/datasets/p3_t5xl.gin:349
  assert [t for b in batches for t in b["inputs"]] == texts
  vocabulary, length = data_lib.vocabulary("p3_dream"), data_lib.feature_lengths()["inputs"]
  tokens = np.concatenate([b["encoder_input_tokens"] for b in batches])
  for row, text in zip(tokens, texts):
    encoded = vocab_lib.encode(vocabulary, text, length)
    assert row[:len(encoded)].tolist() == list(encoded) and not row[len(encoded):].any()
