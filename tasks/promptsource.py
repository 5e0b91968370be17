"""promptsource templates, read from their YAML files and rendered with jinja2 (algorithm.md §6).

Reproduces promptsource 0.2.3's `Template.apply` without the package: YAML with the custom tags
`!Template` / `!TemplateMetadata`; jinja2 with promptsource's globals (`zip`) and filters (`choice`,
`most_frequent`, `highlight`); example fields truncated to 2048 characters; `|||` separating input and
target (and answer choices), with `|||` inside example values protected while splitting.
"""
import collections
import dataclasses
import json
import pathlib
import random
import zlib
from typing import Optional

import jinja2
import yaml

from phatgoose_jax.tasks import sources

TEXT_VAR_LENGTH = 2048
_PIPE_PROTECTOR = "3ed2dface8203c4c9dfb1a5dc58e41e0"
_RNG = random.Random(0)


@dataclasses.dataclass(frozen=True)
class Template:
  """One promptsource template: `jinja` renders "input ||| target"; `answer_choices` "a ||| b ..."."""
  id: str
  name: str
  jinja: str
  answer_choices: Optional[str]
  original_task: bool
  metrics: tuple


def _most_frequent(items):
  if not items:
    return None
  counts = collections.Counter(items).most_common()
  return [item for item, count in counts if count == counts[0][1]]


def _environment() -> jinja2.Environment:
  env = jinja2.Environment(loader=jinja2.BaseLoader)
  env.globals.update(zip=zip)
  env.filters["choice"] = lambda choices: _RNG.choice(choices)
  env.filters["most_frequent"] = _most_frequent
  env.filters["highlight"] = lambda text: "<span style='color: #F08080'>" + text + "</span>"
  return env


_ENV = _environment()


class _Loader(yaml.SafeLoader):
  """SafeLoader that reads promptsource's `!Template` / `!TemplateMetadata` tags as plain mappings."""


def _mapping(loader, node):
  return loader.construct_mapping(node, deep=True)


_Loader.add_constructor("!Template", _mapping)
_Loader.add_constructor("!TemplateMetadata", _mapping)


def _template(raw: dict) -> Template:
  metadata = raw.get("metadata") or {}
  return Template(id=raw["id"], name=raw["name"], jinja=raw["jinja"], answer_choices=raw.get("answer_choices"),
                  original_task=bool(metadata.get("original_task")), metrics=tuple(metadata.get("metrics") or ()))


def templates_file(dataset: str, templates_dir=None) -> pathlib.Path:
  """`<templates_dir>/<dataset>/templates.yaml`, `dataset` like "super_glue/rte"."""
  root = templates_dir or sources.get_dir("templates_dir")
  path = pathlib.Path(root, dataset, "templates.yaml")
  if not path.is_file():
    raise sources.missing(f"promptsource templates of {dataset}", str(path), sources.DIR_KINDS["templates_dir"][2])
  return path


def load_templates(dataset: str, templates_dir=None, original_task_only: bool = False) -> list:
  """The templates of `dataset` in file order (optionally only those with `metadata.original_task`)."""
  with open(templates_file(dataset, templates_dir), encoding="utf-8") as f:
    raw = yaml.load(f, Loader=_Loader)
  templates = [_template(t) for t in (raw.get("templates") or {}).values()]
  return [t for t in templates if t.original_task or not original_task_only]


def _protect(example: dict) -> dict:
  return {k: v.replace("|||", _PIPE_PROTECTOR) if isinstance(v, str) else v for k, v in example.items()}


def _seed(template: Template, example: dict):
  _RNG.seed(zlib.crc32((template.id + json.dumps(example, sort_keys=True, default=str)).encode()))


def answer_choices(template: Template, example: dict) -> Optional[list]:
  """The template's answer choices for `example`, or None for an open-ended template."""
  if template.answer_choices is None:
    return None
  rendered = _ENV.from_string(template.answer_choices).render(**_protect(example))
  return [choice.strip().replace(_PIPE_PROTECTOR, "|||") for choice in rendered.split("|||")]


def apply(template: Template, example: dict) -> list:
  """[input, target] (target absent when the template yields none), as promptsource's `apply`."""
  if "answer_choices" in example:
    raise ValueError("Example contains the restricted key 'answer_choices'.")
  _seed(template, example)
  jinja = template.jinja.replace("}}", f" | string | truncate({TEXT_VAR_LENGTH}) }}}}")
  context = _protect(example)
  context["answer_choices"] = answer_choices(template, example)
  rendered = _ENV.from_string(jinja).render(**context)
  return [part.replace(_PIPE_PROTECTOR, "|||").strip() for part in rendered.split("|||")]
