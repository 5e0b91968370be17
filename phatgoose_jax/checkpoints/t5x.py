"""t5x checkpoints (`checkpoint_N/`: a msgpack `checkpoint` file + one tensorstore zarr array per parameter).

The layout, as t5x's `Checkpointer` writes it (version 3):
  checkpoint_N/checkpoint   flax msgpack of `{'version': 3, 'optimizer': {'target': params, 'state': {...}}}`;
                            every array written to tensorstore is replaced there by its tensorstore spec
                            (a dict: `{'driver': 'zarr', 'dtype': ..., 'kvstore': {'driver': 'file',
                            'path': 'target.encoder.layers_0.attention.query.kernel'}, 'metadata': {...}}`),
                            whose path is relative to `checkpoint_N/`; small arrays sit in the msgpack itself.
  checkpoint_N/target.encoder.layers_0.attention.query.kernel/   a zarr array (`.zarray` + gzip chunks).
`target` holds the model parameters (our tree, unchanged); `state` holds the step and the optimizer's
per-parameter states, which are not read. t5x checkpoints carry no model config: pass a `T5Config` or let
`infer_config_from_params` read the sizes off the shapes.
"""
import os
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import ml_dtypes
import numpy as np
import tensorstore as ts
from flax import serialization

from phatgoose_jax.checkpoints import names
from phatgoose_jax.t5.config import T5Config

VERSION = 3
_CHUNK_BYTES = 64 * 1024 * 1024


def _is_spec(node) -> bool:
  return isinstance(node, dict) and "driver" in node and ("kvstore" in node or "path" in node)


def _chunk_shape(shape: Sequence[int], max_elements: int) -> List[int]:
  """The largest chunk shape dividing `shape` with at most `max_elements` elements (largest dims split first)."""
  divisors = [[d for d in range(1, n + 1) if n % d == 0] for n in shape]
  while np.prod([d[-1] for d in divisors]) > max_elements:
    max(divisors, key=lambda d: d[-1]).pop()
  return [d[-1] for d in divisors]


def _write_array(ckpt_dir: str, name: str, array: np.ndarray, dtype: str) -> dict:
  """Write one array as zarr under `ckpt_dir/<name with '.'>`; return its relative tensorstore spec."""
  array = np.asarray(array).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
  rel = name.replace("/", ".")
  metadata = {"compressor": {"id": "gzip"}, "shape": list(array.shape),
              "chunks": _chunk_shape(array.shape, _CHUNK_BYTES // array.dtype.itemsize)}
  spec = {"driver": "zarr", "dtype": dtype, "kvstore": {"driver": "file", "path": rel}, "metadata": metadata}
  absolute = dict(spec, kvstore={"driver": "file", "path": os.path.join(ckpt_dir, rel)})
  ts.open(absolute, create=True, open=True).result().write(array).result()
  return ts.Spec(spec).to_json()


def _write_tree(ckpt_dir: str, prefix: str, tree: dict, dtype: Optional[str]) -> dict:
  """Write every array leaf to tensorstore (cast to `dtype`, or its own dtype); return the tree of specs."""
  flat = names.flatten(tree)
  specs = {k: _write_array(ckpt_dir, f"{prefix}/{k}", v, dtype or np.asarray(v).dtype.name)
           for k, v in flat.items()}
  return names.unflatten(specs)


def save_t5x(directory: str, params: dict, step: int, *, dtype: str = "float32",
             param_states: Optional[dict] = None) -> str:
  """Write `directory/checkpoint_<step>/` in the t5x layout; returns that path.

  `params` is written as `target` (cast to `dtype`, e.g. 'bfloat16'); `param_states` (any nested dict of
  arrays, e.g. Adafactor's `v_row`/`v_col`) as `state/param_states`. Like t5x, the files go to a temporary
  directory that is renamed when complete.
  """
  final_dir = os.path.join(directory, f"checkpoint_{step}")
  tmp_dir = f"{final_dir}.tmp-{int(time.time())}"
  os.makedirs(tmp_dir)
  state = {"step": np.asarray(step, np.int32)}
  if param_states is not None:
    state["param_states"] = _write_tree(tmp_dir, "state/param_states", param_states, None)
  optimizer = {"target": _write_tree(tmp_dir, "target", params, dtype), "state": state}
  with open(os.path.join(tmp_dir, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize({"version": VERSION, "optimizer": optimizer}))
  os.rename(tmp_dir, final_dir)
  return final_dir


def find_checkpoint_dir(path: str) -> str:
  """`path` itself if it holds a t5x `checkpoint` file, else its latest `checkpoint_N/` sub-directory."""
  if path.startswith("gs://"):
    raise ValueError(f"{path}: copy the checkpoint to a local directory first (gsutil -m cp -r)")
  if os.path.isfile(os.path.join(path, "checkpoint")):
    return path
  steps = [int(m.group(1)) for m in map(re.compile(r"checkpoint_(\d+)").fullmatch, _listdir(path))
           if m and os.path.isfile(os.path.join(path, m.group(0), "checkpoint"))]
  if not steps:
    raise FileNotFoundError(f"{path} is not a t5x checkpoint: no 'checkpoint' file and no checkpoint_N/checkpoint")
  return os.path.join(path, f"checkpoint_{max(steps)}")


def _listdir(path: str) -> List[str]:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no such t5x checkpoint directory: {path}")
  return os.listdir(path)


def _read_msgpack(ckpt_dir: str) -> dict:
  """The `optimizer` state dict of the msgpack file (versions >= 2), or the whole file (version 0, plain flax)."""
  path = os.path.join(ckpt_dir, "checkpoint")
  with open(path, "rb") as f:
    raw = f.read()
  if raw.startswith(b"model_checkpoint_path"):
    raise ValueError(f"{path} is a TensorFlow checkpoint index, not a t5x msgpack checkpoint")
  try:
    contents = serialization.msgpack_restore(raw)
  except Exception as e:
    raise ValueError(f"{path} is not a readable t5x msgpack checkpoint: {e}") from e
  optimizer = contents.get("optimizer", contents) if isinstance(contents, dict) else contents
  if not isinstance(optimizer, dict) or "target" not in optimizer:
    found = sorted(optimizer) if isinstance(optimizer, dict) else type(optimizer).__name__
    raise ValueError(f"{path} has no 'target' (parameter) tree; found {found}")
  return optimizer


def _local_spec(spec: dict, ckpt_dir: str) -> dict:
  """The stored (relative, possibly gcs / pre-0.1.14) spec as an absolute local `file` spec, chunking dropped."""
  rel = spec.get("kvstore", {}).get("path") or spec.get("path")
  if rel is None:
    raise ValueError(f"tensorstore spec without a path: {spec}")
  metadata = {k: v for k, v in spec.get("metadata", {}).items() if k not in ("chunks", "compressor")}
  local = {"driver": spec["driver"], "kvstore": {"driver": "file", "path": os.path.join(ckpt_dir, rel)},
           "metadata": metadata}
  if "dtype" in spec:
    local["dtype"] = spec["dtype"]
  return local


def _read_array(spec: dict, ckpt_dir: str, name: str) -> np.ndarray:
  """Read one tensorstore array as float32 (bf16, and bf16 stored as uint16 by old t5x, included)."""
  local = _local_spec(spec, ckpt_dir)
  try:
    array = ts.open(local, open=True, read=True).result().read().result()
  except Exception as e:
    raise ValueError(f"cannot read parameter {name} from {local['kvstore']['path']}: {e}") from e
  if array.dtype == np.uint16:
    array = array.view(ml_dtypes.bfloat16)
  return np.asarray(array, np.float32)


def _leaves(node, prefix: str = "") -> Dict[str, object]:
  """Flatten a msgpack tree to '/'-keyed leaves, keeping tensorstore spec dicts whole."""
  if _is_spec(node) or not isinstance(node, dict):
    return {prefix: node}
  flat = {}
  for key, value in node.items():
    flat.update(_leaves(value, f"{prefix}/{key}" if prefix else key))
  return flat


def read_t5x_target(path: str) -> Dict[str, np.ndarray]:
  """The `target` (parameter) tree of a t5x checkpoint as a flat '/'-keyed dict of float32 arrays."""
  ckpt_dir = find_checkpoint_dir(path)
  leaves = _leaves(_read_msgpack(ckpt_dir)["target"])
  return {k: _read_array(v, ckpt_dir, k) if _is_spec(v) else np.asarray(v, np.float32) for k, v in leaves.items()}


def _layer_count(flat: Dict[str, np.ndarray], stack: str) -> int:
  return len({m.group(1) for k in flat for m in [re.match(rf"{stack}/layers_(\d+)/", k)] if m})


def infer_config_from_params(params: dict, relative_attention_max_distance: int = 128) -> T5Config:
  """Read the sizes of a T5 v1.1 off its parameter shapes (max distance is not stored: pass it if not 128)."""
  flat = names.flatten(params)
  needed = ("token_embedder/embedding", "encoder/relpos_bias/rel_embedding",
            "encoder/layers_0/attention/query/kernel", "encoder/layers_0/mlp/wi_0/kernel")
  missing = [k for k in needed if k not in flat]
  if missing:
    raise ValueError(f"cannot infer a T5 v1.1 config: missing {missing}")
  vocab, d_model = np.shape(flat[needed[0]])
  heads, buckets = np.shape(flat[needed[1]])
  joined = np.shape(flat[needed[2]])[1]
  if joined % heads:
    raise ValueError(f"query kernel width {joined} is not a multiple of the {heads} heads of rel_embedding")
  return T5Config(vocab_size=int(vocab), d_model=int(d_model), d_kv=int(joined // heads),
                  d_ff=int(np.shape(flat[needed[3]])[1]), num_heads=int(heads),
                  num_encoder_layers=_layer_count(flat, "encoder"), num_decoder_layers=_layer_count(flat, "decoder"),
                  relative_attention_num_buckets=int(buckets),
                  relative_attention_max_distance=relative_attention_max_distance)


def _target_shapes(ckpt_dir: str) -> Dict[str, tuple]:
  """{name: shape} of the `target` tree, from the msgpack alone (tensorstore specs carry their shapes)."""
  return {k: tuple(v["metadata"]["shape"]) if _is_spec(v) else np.shape(v)
          for k, v in _leaves(_read_msgpack(ckpt_dir)["target"]).items()}


def architecture(path: str) -> T5Config:
  """The T5 v1.1 sizes of a t5x checkpoint, read off the shapes its msgpack file records."""
  shapes = _target_shapes(find_checkpoint_dir(path))
  return infer_config_from_params(names.unflatten({k: jax.ShapeDtypeStruct(v, np.float32)
                                                   for k, v in shapes.items()}))


def _open_sliced(ckpt_dir: str, name: str, node):
  """`(index) -> float32 slice` of one stored leaf: a tensorstore array read only where asked."""
  if not _is_spec(node):
    return lambda index: np.asarray(node, np.float32)[index]
  local = _local_spec(node, ckpt_dir)
  try:
    store = ts.open(local, open=True, read=True).result()
  except Exception as e:
    raise ValueError(f"cannot read parameter {name} from {local['kvstore']['path']}: {e}") from e

  def read(index):
    array = store[index].read().result()
    return np.asarray(array.view(ml_dtypes.bfloat16) if array.dtype == np.uint16 else array, np.float32)
  return read


def load_t5x(path: str, config: Optional[T5Config] = None, shardings: Optional[dict] = None,
             dtype=np.float32) -> Tuple[T5Config, dict]:
  """`(config, params)` from a t5x checkpoint (a `checkpoint_N/` directory or its parent: latest step).

  With `config` the parameters are checked against it (missing, unexpected and wrongly-shaped names are
  listed); without, the config is inferred from the shapes. With `shardings` (a tree of `NamedSharding`s of
  our params) every array is restored straight into its sharding in `dtype`, each process reading only the
  slices its devices hold (`names.place_sliced`); else whole float32 numpy arrays.
  """
  if shardings is not None:
    ckpt_dir = find_checkpoint_dir(path)
    shapes = _target_shapes(ckpt_dir)
    config = config or architecture(ckpt_dir)
    names.check_shapes(names.param_shapes(config), shapes, f"t5x checkpoint {ckpt_dir}")
    leaves = _leaves(_read_msgpack(ckpt_dir)["target"])
    readers = {k: _open_sliced(ckpt_dir, k, v) for k, v in leaves.items()}
    flat = names.place_sliced(shapes, names.flatten(shardings), dtype, lambda n, index: readers[n](index))
    return config, names.unflatten(flat)
  flat = read_t5x_target(path)
  params = names.unflatten(flat)
  config = config or infer_config_from_params(params)
  names.check_shapes(names.param_shapes(config), {k: v.shape for k, v in flat.items()},
                     f"t5x checkpoint {find_checkpoint_dir(path)}")
  return config, params
