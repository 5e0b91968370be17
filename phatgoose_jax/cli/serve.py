"""`phatgoose serve`: the OpenAI-compatible server of a base and its library under uvicorn."""
from phatgoose_jax.cli import UsageError, model


def run(args) -> int:
  import uvicorn  # pylint: disable=import-outside-toplevel
  from phatgoose_jax import data, vocab  # pylint: disable=import-outside-toplevel
  from phatgoose_jax.serving import app  # pylint: disable=import-outside-toplevel
  from phatgoose_jax import main  # pylint: disable=import-outside-toplevel
  main.parse(args.gin_file, args.gin, require=False)  # the mesh and rules, as evaluation's
  try:
    data.check_vocabulary(vocab.get_vocabulary(args.vocab), args.base)  # before the server starts
  except ValueError as e:
    raise UsageError(str(e)) from e
  config = {"base": args.base, "library": args.library, "top_k": args.top_k, "batch_size": args.batch_size,
            "max_queue": args.max_queue, "timeout_s": args.timeout, "dtype": args.dtype, "vocab": args.vocab,
            "max_tokens": args.max_tokens, "max_input": args.max_input, "capacity": args.capacity,
            "max_top_k": args.max_top_k, "warm_up": args.warm_up}
  uvicorn.run(app.create_app(config), host=args.host, port=args.port, log_level="info",
              timeout_graceful_shutdown=args.timeout)
  return 0


def register(subparsers):
  serve = subparsers.add_parser("serve", help="serve the base and its library's experts and routers over HTTP "
                                              "(OpenAI completions API)")
  serve.add_argument("--base", required=True, help="the base checkpoint (any format)")
  serve.add_argument("--library", help="an expert library: serves each expert and each router over them")
  serve.add_argument("--host", default="127.0.0.1")
  serve.add_argument("--port", type=int, default=8000)
  serve.add_argument("--top_k", type=int, default=2, help="experts per token of the routers (a request's top_k "
                                                           "overrides it)")
  serve.add_argument("--max_top_k", type=int, help="the largest top_k a request may ask of the per-token routers "
                                                   "(default --top_k; every step computes this many per token)")
  serve.add_argument("--capacity", type=int, help="expert slots of the live library (default: its experts + 8): "
                                                  "experts added while serving fill free slots without recompiling")
  serve.add_argument("--batch_size", type=int, default=8, help="rows of every compiled batch, and sequences "
                                                               "decoded at once per model")
  serve.add_argument("--max_tokens", type=int, default=256, help="the most tokens a completion may ask for")
  serve.add_argument("--max_input", type=int, help="the longest prompt in tokens (default: the model's)")
  serve.add_argument("--warm_up", action="store_true", help="compile every length bucket before serving, so "
                                                            "that no request waits for a compilation")
  serve.add_argument("--max_queue", type=int, default=256, help="requests waiting before 429")
  serve.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait for its batch")
  serve.add_argument("--dtype", default="float32", choices=model.PRECISIONS, help=model.PRECISION_HELP)
  serve.add_argument("--vocab", default="byte", help="'byte' or the path of a SentencePiece .model")
  serve.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable), e.g. the mesh")
  serve.add_argument("--gin", action="append", default=[], metavar="KEY=VALUE",
                     help="gin binding (repeatable): the mesh and rules as evaluation takes them, e.g. "
                          "'partitioning.make_mesh.model = 4' to split a model too large for one device")
  serve.set_defaults(func=run)
