"""Serving a base, its library's experts and routers over them: `engine.Engine` (models and scheduler) behind the
OpenAI-compatible FastAPI application of `app.create_app`, run by `phatgoose serve`."""
