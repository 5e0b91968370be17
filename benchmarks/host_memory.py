"""Peak host memory of `phatgoose train-expert` against the checkpoint's parameter bytes.

Usage: python benchmarks/host_memory.py [--layers 8] [--steps 2] [--batch 4] [--repeats 2] [--gin BINDING]...
                                       [--repo PATH] [--json]

Two random Hugging Face T5 v1.1 checkpoints are made with transformers (safetensors, float32): one of
T5-large width (d_model 1024, d_ff 2816, 16 heads, vocabulary 32128) with `--layers` encoder and decoder
layers, and the tiny preset. `train-expert` then runs on each for `--steps` steps at batch `--batch` on a
JSONL task of byte-vocabulary text (inputs 64, targets 16 tokens), each in its own process, and the peak
resident set (`ru_maxrss` of that process) is read. The figure is

  (peak(large) - peak(tiny)) / parameter bytes of the large checkpoint

what a bigger base costs in host memory beyond the fixed cost of the stack (goal <= 1.3). The large base reads
a SentencePiece word vocabulary of 32000 pieces made here (the stages refuse a vocabulary that does not fit the
embedding), the tiny one the byte vocabulary. Each pair runs `--repeats` times: the figure is from the smallest
peaks, with their spread. `--gin` adds a binding to both runs (e.g. the model layout:
`--gin "utils.model_config.scan_layers = True" --gin "utils.model_config.remat_policy = 'full'"`). `--repo`
runs another checkout's code (e.g. a `git worktree` of an earlier commit) to show a change's effect.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import common

GiB = 1024 ** 3
LARGE = dict(d_model=1024, d_ff=2816, num_heads=16, d_kv=64, vocab_size=32128)
TINY = dict(d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=259, relative_attention_num_buckets=8,
            relative_attention_max_distance=20)


def make_checkpoint(path: str, layers: int, **sizes) -> int:
  """A random T5 v1.1 (gated-GELU, untied) saved with transformers; returns its parameter bytes."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  config = transformers.T5Config(num_layers=layers, num_decoder_layers=layers, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False, decoder_start_token_id=0, **sizes)
  model = transformers.T5ForConditionalGeneration(config)
  model.save_pretrained(path, safe_serialization=True)
  return sum(p.numel() * p.element_size() for p in model.parameters())


def make_vocabulary(path: str, pieces: int = 32000) -> str:
  """A SentencePiece word model of `pieces` pieces (pad 0, EOS 1, unk 2) over random words, saved at `path`."""
  import io  # pylint: disable=import-outside-toplevel
  import random  # pylint: disable=import-outside-toplevel
  import sentencepiece  # pylint: disable=import-outside-toplevel
  rng = random.Random(0)
  words = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8)) for _ in range(pieces + 2000)})
  model = io.BytesIO()
  lines = (" ".join(words[i:i + 20]) for i in range(0, len(words), 20))
  sentencepiece.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, vocab_size=pieces,
                                           model_type="word", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=3)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return path


def peak_rss(base: str, work: str, steps: int, batch: int, repo: str, vocabulary: str = "byte",
             bindings: tuple = ()) -> int:
  """Peak RSS in bytes of one `train-expert` process on `base`."""
  task = os.path.join(work, "reverse.jsonl")
  with open(task, "w") as f:
    for i in range(64):
      word = f"word{i:03d}"
      f.write(json.dumps({"inputs": f"reverse: {word}", "targets": word[::-1]}) + "\n")
  for name in ("lib", "w"):
    shutil.rmtree(os.path.join(work, name), ignore_errors=True)
  cmd = [sys.executable, "-m", "phatgoose_jax.cli", "train-expert", "--base", base, "--task", task, "--library",
         os.path.join(work, "lib"), "--name", "reverse", "--workdir", os.path.join(work, "w"), "--gin",
         f"train.train_expert.num_steps = {steps}", "--gin", f"train.fit.batch_size = {batch}", "--gin",
         "train.fit.loss_groups = 1", "--gin", f"data.resolve.jsonl_vocabulary = {vocabulary!r}", "--gin",
         "data.feature_lengths.inputs = 64", "--gin", "data.feature_lengths.targets = 16"]
  for binding in bindings:
    cmd += ["--gin", binding]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo)
  probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
  done = subprocess.run([sys.executable, "-c", probe] + cmd, capture_output=True, text=True, env=env, cwd=work)
  if done.returncode:
    raise RuntimeError(f"train-expert failed on {base}: {done.stderr[-2000:]}")
  return int(done.stdout.strip().splitlines()[-1]) * 1024  # kilobytes on Linux


def main() -> int:
  p = common.parser(__doc__)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--gin", action="append", default=[], help="a gin binding for both runs (repeatable)")
  p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  args = p.parse_args()
  root = tempfile.mkdtemp(prefix="host_memory_")
  vocabulary = make_vocabulary(os.path.join(root, "spiece.model"))
  result = {"repo": args.repo, "layers": args.layers, "steps": args.steps, "batch": args.batch, "gin": args.gin}
  bases = (("large", args.layers, LARGE, vocabulary), ("tiny", 2, TINY, "byte"))
  for name, layers, sizes, _ in bases:
    result[f"{name}_param_bytes"] = make_checkpoint(os.path.join(root, name), layers, **sizes)
    os.makedirs(os.path.join(root, f"work_{name}"))
  for _ in range(args.repeats):
    for name, _, _, vocab in bases:
      result.setdefault(f"{name}_peak_rss_bytes_runs", []).append(
          peak_rss(os.path.join(root, name), os.path.join(root, f"work_{name}"), args.steps, args.batch, args.repo,
                   vocab, tuple(args.gin)))
  for name, *_ in bases:
    result[f"{name}_peak_rss_bytes"] = min(result[f"{name}_peak_rss_bytes_runs"])
  ratio = lambda large, tiny: (large - tiny) / result["large_param_bytes"]  # noqa: E731
  result["ratio"] = ratio(result["large_peak_rss_bytes"], result["tiny_peak_rss_bytes"])
  result["ratio_runs"] = [ratio(a, b) for a, b in zip(result["large_peak_rss_bytes_runs"],
                                                      result["tiny_peak_rss_bytes_runs"])]
  if args.json:
    print(json.dumps(result))
  else:
    runs = lambda name: ", ".join(f"{x / GiB:.2f}" for x in result[f"{name}_peak_rss_bytes_runs"])  # noqa: E731
    print(f"parameters {result['large_param_bytes'] / GiB:.2f} GiB; peak RSS {result['large_peak_rss_bytes'] / GiB:.2f}"
          f" GiB (runs {runs('large')}), tiny base {result['tiny_peak_rss_bytes'] / GiB:.2f} GiB (runs "
          f"{runs('tiny')}): (large - tiny) / parameters = {result['ratio']:.2f} (runs "
          f"{', '.join(f'{r:.2f}' for r in result['ratio_runs'])})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
