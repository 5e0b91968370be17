"""Peak host memory of `phatgoose train-expert` against the checkpoint's parameter bytes.

Usage: python benchmarks/host_memory.py [--layers 8] [--steps 2] [--batch 4] [--repo PATH] [--json]

Two random Hugging Face T5 v1.1 checkpoints are made with transformers (safetensors, float32): one of
T5-large width (d_model 1024, d_ff 2816, 16 heads, vocabulary 32128) with `--layers` encoder and decoder
layers, and the tiny preset. `train-expert` then runs on each for `--steps` steps at batch `--batch` on a
JSONL task of byte-vocabulary text (inputs 64, targets 16 tokens), each in its own process, and the peak
resident set (`ru_maxrss` of that process) is read. The figure is

  (peak(large) - peak(tiny)) / parameter bytes of the large checkpoint

what a bigger base costs in host memory beyond the fixed cost of the stack (goal <= 1.3). `--repo` runs
another checkout's code (e.g. a `git worktree` of an earlier commit) to show a change's effect.
"""
import json
import os
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


def peak_rss(base: str, work: str, steps: int, batch: int, repo: str) -> int:
  """Peak RSS in bytes of one `train-expert` process on `base`."""
  task = os.path.join(work, "reverse.jsonl")
  with open(task, "w") as f:
    for i in range(64):
      word = f"word{i:03d}"
      f.write(json.dumps({"inputs": f"reverse: {word}", "targets": word[::-1]}) + "\n")
  cmd = [sys.executable, "-m", "phatgoose_jax.cli", "train-expert", "--base", base, "--task", task, "--library",
         os.path.join(work, "lib"), "--name", "reverse", "--workdir", os.path.join(work, "w"), "--gin",
         f"train.train_expert.num_steps = {steps}", "--gin", f"train.fit.batch_size = {batch}", "--gin",
         "data.resolve.jsonl_vocabulary = 'byte'", "--gin", "data.feature_lengths.inputs = 64", "--gin",
         "data.feature_lengths.targets = 16"]
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
  p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  args = p.parse_args()
  root = tempfile.mkdtemp(prefix="host_memory_")
  result = {"repo": args.repo, "layers": args.layers, "steps": args.steps, "batch": args.batch}
  for name, layers, sizes in (("large", args.layers, LARGE), ("tiny", 2, TINY)):
    path = os.path.join(root, name)
    result[f"{name}_param_bytes"] = make_checkpoint(path, layers, **sizes)
    os.makedirs(os.path.join(root, f"work_{name}"))
    result[f"{name}_peak_rss_bytes"] = peak_rss(path, os.path.join(root, f"work_{name}"), args.steps, args.batch,
                                                args.repo)
  result["ratio"] = (result["large_peak_rss_bytes"] - result["tiny_peak_rss_bytes"]) / result["large_param_bytes"]
  if args.json:
    print(json.dumps(result))
  else:
    print(f"parameters {result['large_param_bytes'] / GiB:.2f} GiB; peak RSS {result['large_peak_rss_bytes'] / GiB:.2f}"
          f" GiB (tiny base {result['tiny_peak_rss_bytes'] / GiB:.2f} GiB): (large - tiny) / parameters = "
          f"{result['ratio']:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
